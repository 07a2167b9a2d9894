/*
 * The migration test workload: a stateful process whose state can be checked from its output.
 *
 *   workload [MIB] [SEED]   (defaults: 64 MiB, seed 42; env WORKLOAD_MIB / WORKLOAD_SEED too)
 *
 * At start it fills MIB MiB with a pseudo-random pattern derived from SEED and writes
 * /workload-state.txt into its root fs (a file change that must travel with a migration).
 * Then every 10 ms it prints one line:
 *
 *   tick=<counter> ms=<unix time in ms> mem=<ok|BAD> checked=<MiB checked so far>
 *
 * Each tick re-derives one MiB of the pattern and compares it with memory (round-robin over
 * the whole allocation), so a corrupted or lost page is reported as mem=BAD within
 * MIB ticks. The counter lives in memory only: after a restore it continues where it stopped.
 * With WORKLOAD_EXIT_AFTER=N (and WORKLOAD_EXIT_CODE=C) it exits with code C after N ticks.
 * With WORKLOAD_CONNECT=a.b.c.d:port it keeps one TCP connection to that server open and writes
 * each tick line to it as well (an established connection a migration must carry or close).
 * It retries the connect for up to 30 s (the server may be a sibling container still starting).
 * With WORKLOAD_LISTEN=port it serves on that TCP port: each client gets one line,
 * "tick=<counter> mem=<ok|BAD>", and the connection is closed (the service a user reaches on
 * the pod IP; the listening socket travels with the migration).
 * With WORKLOAD_SINK=port it also accepts long-lived connections on that port (a sibling's
 * WORKLOAD_CONNECT) and reads their "tick=N" lines; the WORKLOAD_LISTEN answer then ends with
 * " sink=<connections accepted>/<connections closed>/<lines>/<last N>/<gaps>", a gap being a
 * line whose N is not the previous N + 1 (a connection that survives a migration: one
 * connection, none closed, no gap).
 * With WORKLOAD_JOURNAL=path it appends "tick=<counter>\n" to that file every 50 ticks through
 * one descriptor it keeps open (state in a volume: the file must be at the destination, the
 * same size, before the process is restored, and the lines go on without a gap).
 * Built static (gcc -static) so the image is one file.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <signal.h>
#include <fcntl.h>
#include <errno.h>

static uint64_t pattern_word(uint64_t seed, uint64_t index) {
    /* splitmix64 of (seed, index): any word can be recomputed independently. */
    uint64_t z = seed * 0x9E3779B97F4A7C15ULL + index + 1;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static long arg_or_env(int argc, char **argv, int i, const char *env, long fallback) {
    if (argc > i) return atol(argv[i]);
    const char *v = getenv(env);
    return v ? atol(v) : fallback;
}

/* A non-blocking TCP listener on every address, or -1 (errno set). */
static int listen_on(const char *port, int backlog) {
    struct sockaddr_in addr = {0};
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)atoi(port));
    addr.sin_addr.s_addr = htonl(INADDR_ANY);
    int one = 1;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
        bind(fd, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(fd, backlog) != 0) {
        return -1;
    }
    fcntl(fd, F_SETFL, O_NONBLOCK);
    return fd;
}

int main(int argc, char **argv) {
    long mib = arg_or_env(argc, argv, 1, "WORKLOAD_MIB", 64);
    uint64_t seed = (uint64_t)arg_or_env(argc, argv, 2, "WORKLOAD_SEED", 42);
    if (mib < 1) mib = 1;
    const size_t words_per_mib = (1024 * 1024) / sizeof(uint64_t);
    size_t words = (size_t)mib * words_per_mib;
    uint64_t *memory = malloc(words * sizeof(uint64_t));
    if (!memory) {
        fprintf(stderr, "cannot allocate %ld MiB\n", mib);
        return 2;
    }
    for (size_t i = 0; i < words; i++) memory[i] = pattern_word(seed, i);

    FILE *state = fopen("/workload-state.txt", "w");
    if (!state) {
        perror("/workload-state.txt");
        return 3;
    }
    fprintf(state, "workload seed=%llu mib=%ld pid=%d\n", (unsigned long long)seed, mib, getpid());
    fclose(state);
    setvbuf(stdout, NULL, _IOLBF, 0);
    int peer = -1;
    const char *connect_to = getenv("WORKLOAD_CONNECT");
    if (connect_to && *connect_to) {
        char host[64] = {0};
        int port = 0;
        if (sscanf(connect_to, "%63[^:]:%d", host, &port) != 2) {
            fprintf(stderr, "WORKLOAD_CONNECT must be address:port\n");
            return 4;
        }
        struct sockaddr_in addr = {0};
        addr.sin_family = AF_INET;
        addr.sin_port = htons((unsigned short)port);
        inet_pton(AF_INET, host, &addr.sin_addr);
        for (int attempt = 0;; attempt++) {
            peer = socket(AF_INET, SOCK_STREAM, 0);
            if (peer >= 0 && connect(peer, (struct sockaddr *)&addr, sizeof addr) == 0) break;
            if (attempt == 300) {
                perror("connect");
                return 5;
            }
            if (peer >= 0) close(peer);
            struct timespec pause = {0, 100 * 1000 * 1000};
            nanosleep(&pause, NULL);
        }
        signal(SIGPIPE, SIG_IGN);
    }
    int sink = -1, sink_client = -1;
    unsigned long long sink_accepted = 0, sink_closed = 0, sink_lines = 0, sink_last = 0, sink_gaps = 0;
    char sink_buffer[256];
    size_t sink_held = 0;
    const char *sink_port = getenv("WORKLOAD_SINK");
    if (sink_port && *sink_port) {
        sink = listen_on(sink_port, 4);
        if (sink < 0) {
            perror("sink");
            return 8;
        }
    }
    int listener = -1;
    const char *listen_port = getenv("WORKLOAD_LISTEN");
    if (listen_port && *listen_port) {
        listener = listen_on(listen_port, 16);
        if (listener < 0) {
            perror("listen");
            return 6;
        }
        signal(SIGPIPE, SIG_IGN);
    }
    int journal = -1;
    const char *journal_path = getenv("WORKLOAD_JOURNAL");
    if (journal_path && *journal_path) {
        journal = open(journal_path, O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (journal < 0) {
            perror(journal_path);
            return 7;
        }
    }
    printf("start mib=%ld seed=%llu\n", mib, (unsigned long long)seed);

    long exit_after = arg_or_env(0, argv, 1, "WORKLOAD_EXIT_AFTER", 0);
    int exit_code = (int)arg_or_env(0, argv, 1, "WORKLOAD_EXIT_CODE", 0);
    uint64_t tick = 0;
    long checked = 0;
    int bad = 0;
    for (;;) {
        size_t chunk = (size_t)(tick % (uint64_t)mib);
        for (size_t i = chunk * words_per_mib; i < (chunk + 1) * words_per_mib; i++) {
            if (memory[i] != pattern_word(seed, i)) bad = 1;
        }
        checked++;
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);
        long long ms = (long long)now.tv_sec * 1000 + now.tv_nsec / 1000000;
        printf("tick=%llu ms=%lld mem=%s checked=%ld\n", (unsigned long long)tick, ms, bad ? "BAD" : "ok", checked);
        if (peer >= 0) {
            char line[128];
            int n = snprintf(line, sizeof line, "tick=%llu\n", (unsigned long long)tick);
            if (write(peer, line, (size_t)n) < 0) {
                printf("connection lost\n");
                close(peer);
                peer = -1;
            }
        }
        if (sink >= 0) {
            int client;
            while ((client = accept(sink, NULL, NULL)) >= 0) {
                if (sink_client >= 0) close(sink_client);
                fcntl(client, F_SETFL, O_NONBLOCK);
                sink_client = client;
                sink_held = 0;
                sink_accepted++;
            }
            while (sink_client >= 0) {
                if (sink_held == sizeof sink_buffer - 1) sink_held = 0; /* no line that long */
                ssize_t got = read(sink_client, sink_buffer + sink_held, sizeof sink_buffer - 1 - sink_held);
                if (got == 0 || (got < 0 && errno != EAGAIN && errno != EWOULDBLOCK)) {
                    close(sink_client);
                    sink_client = -1;
                    sink_closed++;
                    break;
                }
                if (got < 0) break;
                sink_held += (size_t)got;
                sink_buffer[sink_held] = 0;
                char *line = sink_buffer, *end;
                while ((end = strchr(line, '\n')) != NULL) {
                    unsigned long long n;
                    if (sscanf(line, "tick=%llu", &n) == 1) {
                        if (sink_lines > 0 && n != sink_last + 1) sink_gaps++;
                        sink_last = n;
                        sink_lines++;
                    }
                    line = end + 1;
                }
                sink_held = (size_t)(sink_buffer + sink_held - line);
                memmove(sink_buffer, line, sink_held);
            }
        }
        if (listener >= 0) {
            int client;
            while ((client = accept(listener, NULL, NULL)) >= 0) {
                char line[192];
                int n = snprintf(line, sizeof line, "tick=%llu mem=%s", (unsigned long long)tick, bad ? "BAD" : "ok");
                if (sink >= 0) {
                    n += snprintf(line + n, sizeof line - (size_t)n, " sink=%llu/%llu/%llu/%llu/%llu",
                                  sink_accepted, sink_closed, sink_lines, sink_last, sink_gaps);
                }
                n += snprintf(line + n, sizeof line - (size_t)n, "\n");
                if (write(client, line, (size_t)n) < 0) { /* the client left: nothing to do */ }
                close(client);
            }
        }
        if (journal >= 0 && tick % 50 == 0) {
            char line[64];
            int n = snprintf(line, sizeof line, "tick=%llu\n", (unsigned long long)tick);
            if (write(journal, line, (size_t)n) != n) {
                printf("journal write failed\n");
            }
        }
        tick++;
        if (exit_after > 0 && tick >= (uint64_t)exit_after) {
            fprintf(stderr, "exiting with code %d after %ld ticks\n", exit_code, exit_after);
            return exit_code;
        }
        struct timespec pause = {0, 10 * 1000 * 1000};
        nanosleep(&pause, NULL);
    }
}
