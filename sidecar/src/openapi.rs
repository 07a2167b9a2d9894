//! The OpenAPI 3.1 document of the sidecar API, served at `GET /openapi.json`.

use serde_json::{json, Value};

fn error_response(description: &str) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } })
}

/// Every error answer of the sidecar: (status, endpoints, cause). 4xx: the caller's request
/// or what it sent is wrong (the message names the field, entry or value); 5xx: the sidecar,
/// its engine or the destination failed. Rendered into the document's description and its
/// `x-error-table`.
pub const ERRORS: &[(u16, &str, &str)] = &[
    (400, "/checkpoint, /migrate", "bad query or body: unknown field, invalid destination URL, unknown compression, a volume the pod does not have, a volume both included and excluded; postCopy with leaveRunning or with more than one container"),
    (400, "/restore/preflight", "the body is not a preflight request"),
    (400, "/restore", "the body is not a tar stream or ends early (names where it broke), or is not valid zstd"),
    (401, "all but /healthz, /probe/{name} and /tls", "missing or wrong bearer token"),
    (403, "all but /healthz, /probe/{name} and /tls", "a valid credential outside its scope: the ambassadors' token beyond /create and /logs; a peer's token beyond /info, /restore/preflight, /restore and /restore/pages/{migrationId}, or over plain HTTP"),
    (404, "/probe/{name}, /logs/{name}, /create/{name}, /checkpoint, /migrate", "no such container (in the engine or in migration-containers)"),
    (404, "/migrate/{migrationId}/abort", "no such migration under way here"),
    (404, "any other path", "no such endpoint"),
    (405, "any", "method not allowed"),
    (409, "/checkpoint, /restore, /migrate, /stop, /restore/preflight", "a checkpoint, restore or migration is already in progress"),
    (409, "/checkpoint, /migrate", "nothing to checkpoint; the image tag of a container moved since it started (the image cannot be sent)"),
    (409, "/migrate", "the destination refused in its preflight (detail.problems: engine, CRIU, kernel, architecture, archive version, a missing image with images=never, a volume it lacks, a container already running there); sourceState untouched"),
    (409, "/restore", "a container of the archive already runs here, or its image here has another ID"),
    (409, "/migrate", "aborted by an operator (POST /migrate/{migrationId}/abort) before the destination confirmed; detail: the rollback"),
    (409, "/migrate/{migrationId}/abort", "the destination already runs the containers: the migration is not stopped"),
    (409, "/create/{name}", "the container was migrated away from this pod"),
    (409, "/migrate", "postCopy: the container is not running, or CRIU's page server cannot work here (no CAP_SYS_RESOURCE and fs.pipe-max-size below 4 MiB)"),
    (409, "/restore/pages/{migrationId}", "no lazy restore of that migration here connected in 120 s, or its pages are already being carried"),
    (415, "/restore", "Content-Encoding other than identity or zstd"),
    (422, "/restore", "archive refused, naming the entry or field: digest mismatch, unsafe path or link, entry not in the manifest, unsupported format version, bad manifest or trailer, engine or kernel mismatch, a volume this pod does not mount, an image that does not load with its ID"),
    (422, "/create/{name}", "the container cannot run nested: image missing with imagePullPolicy Never, unresolved env, unknown volume, bad pull policy"),
    (500, "/restore", "the sidecar could not write the archive to its staging directory or put a volume in place"),
    (502, "/create/{name}, /checkpoint, /restore, /info", "the nested engine failed (a pull, naming the image and the registry's answer; a dump or restore, with CRIU's message)"),
    (502, "/migrate", "the destination is unreachable, or the migration failed after the freeze; detail: phase, error, rollback, sourceState"),
    (502, "/restore", "post-copy: the source's page stream ended, broke or stalled 30 s before the last page; the copy here was removed"),
    (503, "/create/{name}, /checkpoint, /migrate, /info", "start mode fail, the podinfo file unreadable, or the nested engine unreachable"),
    (503, "/probe/{name}", "the container exited (not an error of the call: the body holds the exit code, for the ambassador's probe)"),
    (504, "/restore", "a restored container did not run within 60 s"),
];

fn error_table() -> String {
    let mut table = String::from("\n\n## Errors\n\nEvery error is JSON `{\"error\": \"...\", \"detail\": ...}`. 4xx: the request or what it sent is wrong; 5xx: the sidecar, its engine or the destination failed.\n\n| status | endpoints | cause |\n|---|---|---|\n");
    for (status, endpoints, cause) in ERRORS {
        table.push_str(&format!("| {status} | {endpoints} | {cause} |\n"));
    }
    table
}

/// The document.
pub fn document() -> Value {
    let name_param = json!([{ "name": "name", "in": "path", "required": true, "schema": { "type": "string" }, "description": "original container name" }]);
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "ums-sidecar",
            "version": env!("CARGO_PKG_VERSION"),
            "description": format!("The runtime container's agent: nested containers, checkpoint archives, live migration. Every endpoint but /healthz, /probe/{{name}} and /tls requires `Authorization: Bearer <token>` when the sidecar has credentials. The port speaks plain HTTP and TLS (a throwaway certificate, pinned by peers through GET /tls).{}", error_table())
        },
        "x-error-table": ERRORS.iter().map(|(status, endpoints, cause)| json!({ "status": status, "endpoints": endpoints, "cause": cause })).collect::<Vec<_>>(),
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "schemas": {
                "Error": { "type": "object", "required": ["error"], "properties": { "error": { "type": "string" }, "detail": {} } },
                "Container": { "type": "object", "properties": {
                    "name": { "type": "string" }, "id": { "type": "string" }, "state": { "type": "string" },
                    "exitCode": { "type": ["integer", "null"] }, "image": { "type": "string" }, "imageId": { "type": "string" } } },
                "MigrateRequest": { "type": "object", "required": ["destination"], "additionalProperties": false, "properties": {
                    "destination": { "type": "string", "description": "base URL of the destination sidecar" },
                    "containers": { "type": "array", "items": { "type": "string" }, "description": "default: all" },
                    "leaveRunning": { "type": "boolean", "default": false },
                    "compression": { "type": "string", "enum": ["none", "zstd"], "default": "none" },
                    "images": { "type": "string", "enum": ["auto", "always", "never"], "default": "auto", "description": "send images in the archive: those the destination lacks (auto), all, or none (a destination without an image refuses)" },
                    "destinationToken": { "type": "string" },
                    "destinationCertificateSha256": { "type": "string", "description": "SHA-256 (hex) of the destination's certificate, from its GET /tls: required for an https destination, which is accepted with that certificate only" },
                    "migrationId": { "type": "string", "description": "the migration's id (e.g. the coordinator's); default: a new one" },
                    "postCopy": { "type": "boolean", "default": false, "description": "resume at the destination before the memory has arrived; CRIU's lazy pages follow over this migration's connection (one running container; not with leaveRunning). The source stays frozen until the last page arrived; if the page stream breaks first, the copy at the destination is removed and the source runs on" },
                    "expectInstance": { "type": "string", "description": "the sidecar run (instance of GET /healthz) the caller checked the pod with: another one (the runtime container restarted since) is a 409 before anything is frozen" },
                    "volumes": { "type": "object", "additionalProperties": false, "description": "pod volumes (by name) to carry besides the pod-local kinds (emptyDir, ephemeral), or pod-local ones to leave",
                        "properties": { "include": { "type": "array", "items": { "type": "string" } }, "exclude": { "type": "array", "items": { "type": "string" } } } } } },
                "MigrationReport": { "type": "object", "properties": {
                    "migrationId": { "type": "string" }, "destination": { "type": "string" }, "compression": { "type": "string" },
                    "sourceLeftRunning": { "type": "boolean" },
                    "containers": { "type": "array", "items": { "type": "object" } },
                    "volumes": { "type": "array", "items": { "type": "object", "properties": {
                        "name": { "type": "string" }, "kind": { "type": "string" }, "bytes": { "type": "integer" }, "entries": { "type": "integer" } } } },
                    "images": { "type": "array", "items": { "type": "object", "properties": {
                        "image": { "type": "string" }, "imageId": { "type": "string" }, "path": { "type": "string" }, "bytes": { "type": "integer" } } } },
                    "totals": { "type": "object", "properties": {
                        "bytesSent": { "type": "integer" }, "contentBytes": { "type": "integer" }, "preflightMs": { "type": "integer" },
                        "imageSaveMs": { "type": "integer" }, "freezeDumpMs": { "type": "integer" }, "transferMs": { "type": "integer" }, "restoreMs": { "type": "integer" },
                        "postCopyMs": { "type": "integer", "description": "postCopy: from running at the destination to the last page arrived (not downtime)" },
                        "pageBytes": { "type": "integer", "description": "postCopy: bytes of CRIU's page stream" },
                        "downtimeMs": { "type": "integer" }, "totalMs": { "type": "integer" } } },
                    "cleanupWarnings": { "type": "array", "items": { "type": "string" } } } },
                "RestoreReport": { "type": "object", "properties": {
                    "migrationId": { "type": "string" }, "entries": { "type": "integer" }, "contentBytes": { "type": "integer" },
                    "receiveMs": { "type": "integer" }, "restoreMs": { "type": "integer" }, "postCopyMs": { "type": "integer" }, "containers": { "type": "array", "items": { "type": "object" } } } }
            }
        },
        "security": [{ "bearer": [] }],
        "paths": {
            "/healthz": { "get": { "summary": "liveness of the sidecar", "security": [], "responses": { "200": { "description": "ok" } } } },
            "/tls": { "get": { "summary": "the SHA-256 of the throwaway certificate this sidecar serves TLS with on the same port (a peer's token is taken over TLS only)", "security": [], "responses": { "200": { "description": "{\"certificateSha256\": \"<hex>\"}" } } } },
            "/info": { "get": { "summary": "engine, CRIU, kernel, architecture, archive versions and compressions accepted", "responses": { "200": { "description": "sidecar info" }, "401": error_response("missing or wrong token") } } },
            "/containers": { "get": { "summary": "the nested containers", "responses": {
                "200": { "description": "list", "content": { "application/json": { "schema": { "type": "array", "items": { "$ref": "#/components/schemas/Container" } } } } },
                "401": error_response("missing or wrong token") } } },
            "/probe/{name}": { "get": { "summary": "state of one nested container, for the ambassador's probes", "security": [], "parameters": name_param,
                "responses": { "200": { "description": "running (or being migrated, or migrated away)" }, "204": { "description": "created, not started" },
                    "503": { "description": "exited; the body holds the exit code" }, "404": error_response("no such container") } } },
            "/create/{name}": { "post": { "summary": "create (and in active mode start) a nested container from migration-containers, as its ambassador asks when it starts; idempotent while the container runs; one that has ended is made anew (the kubelet started its ambassador again)", "parameters": name_param,
                "responses": { "201": { "description": "created" }, "200": { "description": "already there (or start mode null)" },
                    "404": error_response("not in migration-containers"), "409": error_response("migrated away"),
                    "422": error_response("spec cannot be run nested (image missing with imagePullPolicy Never, unresolved env, bad imagePullPolicy, ...)"),
                    "502": error_response("the nested engine failed (the image pull, naming the image and the registry's answer; or the engine's own error)"),
                    "503": error_response("start mode fail, or podinfo unreadable, or the nested engine unreachable") } } },
            "/stop": { "post": { "summary": "stop every nested container", "responses": { "200": { "description": "containers after stop" }, "409": error_response("busy") } } },
            "/logs/{name}": { "get": { "summary": "output of a nested container as NDJSON {stream, time, data}", "parameters": [
                    { "name": "name", "in": "path", "required": true, "schema": { "type": "string" } },
                    { "name": "follow", "in": "query", "schema": { "type": "boolean" } },
                    { "name": "after", "in": "query", "schema": { "type": "string" }, "description": "only stdout lines (and stderr lines, unless afterStderr) after this UNIX time in nanoseconds (the `time` of the last stdout line seen)" },
                    { "name": "afterStderr", "in": "query", "schema": { "type": "string" }, "description": "only stderr lines after this UNIX time in nanoseconds (the `time` of the last stderr line seen; the engine stamps the two streams apart, so each resumes at its own point)" }],
                "responses": { "200": { "description": "stream", "content": { "application/x-ndjson": {} } }, "404": error_response("no such container") } } },
            "/checkpoint": { "post": { "summary": "freeze and dump the nested containers; the response body is the migration archive, streamed", "parameters": [
                    { "name": "container", "in": "query", "schema": { "type": "string" }, "description": "default: all" },
                    { "name": "leaveRunning", "in": "query", "schema": { "type": "boolean" } },
                    { "name": "compression", "in": "query", "schema": { "type": "string", "enum": ["none", "zstd"] } },
                    { "name": "includeVolumes", "in": "query", "schema": { "type": "string" }, "description": "comma-separated pod volumes to carry besides the pod-local ones" },
                    { "name": "excludeVolumes", "in": "query", "schema": { "type": "string" }, "description": "comma-separated pod-local volumes to leave" }],
                "responses": { "200": { "description": "archive", "content": { "application/x-tar": {} } },
                    "400": error_response("unknown compression or query field, a volume the pod does not have, or one both included and excluded"),
                    "404": error_response("no such container"), "409": error_response("busy or nothing to checkpoint"),
                    "502": error_response("the engine failed to dump; detail.rollback says how the containers were brought back"),
                    "503": error_response("podinfo unreadable or engine unreachable") } } },
            "/restore/preflight": { "post": { "summary": "would an archive from this source restore here now? (engine, CRIU, kernel, architecture, images, running containers)",
                "responses": { "200": { "description": "yes, with the images it lacks (`missingImages`) when the source offered to send them" },
                    "400": error_response("not a preflight request"),
                    "409": error_response("no, with the reasons in detail.problems; or busy") } } },
            "/restore": { "post": { "summary": "restore a migration archive (request body, streamed; Content-Encoding zstd accepted); answers when the containers run",
                "parameters": [{ "name": "migrationId", "in": "query", "schema": { "type": "string" } }],
                "requestBody": { "content": { "application/x-tar": {} } },
                "responses": { "200": { "description": "restored", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/RestoreReport" } } } },
                    "400": error_response("the body is not a valid tar stream, or ended early (names where it broke)"),
                    "409": error_response("busy, or a container already runs here, or its image here has another ID"),
                    "415": error_response("Content-Encoding other than identity or zstd"),
                    "422": error_response("archive refused, naming the entry or field: digest mismatch, unsafe path, unsupported format version, engine mismatch, bad manifest or trailer, a volume this pod does not mount, an image that does not load with its ID"),
                    "500": error_response("the sidecar could not write the archive to its staging directory or put a volume in place"),
                    "502": error_response("the nested engine failed to restore a container, or it exited right after"),
                    "504": error_response("a restored container did not run within 60 s") } } },
            "/restore/pages/{migrationId}": { "post": { "summary": "post-copy: the source's CRIU page server, carried both ways while the restore of migrationId runs (request body: from the source; response body: from this side's lazy-pages daemon)",
                "parameters": [{ "name": "migrationId", "in": "path", "required": true, "schema": { "type": "string" } }],
                "requestBody": { "content": { "application/octet-stream": {} } },
                "responses": { "200": { "description": "the daemon's side of the stream", "content": { "application/octet-stream": {} } },
                    "409": error_response("no lazy restore of that migration connected in 120 s, or its pages are already being carried") } } },
            "/migrate": { "post": { "summary": "live-migrate the nested containers to a destination sidecar",
                "requestBody": { "required": true, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/MigrateRequest" } } } },
                "responses": { "200": { "description": "migrated", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/MigrationReport" } } } },
                    "400": error_response("bad body: unknown field, invalid destination URL, unknown compression or images mode, a volume the pod does not have"),
                    "404": error_response("no such container"),
                    "409": error_response("a migration is already in progress, or the destination refused in its preflight (detail.problems), or an image cannot be sent, or postCopy cannot work here"),
                    "502": error_response("the destination is unreachable, or the migration failed after the freeze; detail says in which phase and how the source was brought back"),
                    "503": error_response("podinfo unreadable or engine unreachable") } } },
            "/migrate/{migrationId}/abort": { "post": { "summary": "stop the migration under way before the destination confirms; its own answer is then a 409 with the rollback (the containers run here again)",
                "parameters": [{ "name": "migrationId", "in": "path", "required": true, "schema": { "type": "string" } }],
                "responses": { "202": { "description": "stopping: the migration rolls back" },
                    "404": error_response("no such migration under way here"),
                    "409": error_response("past the point of no return: the destination runs the containers") } } },
            "/openapi.json": { "get": { "summary": "this document", "responses": { "200": { "description": "OpenAPI 3.1" } } } }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every error status an endpoint documents is in the error table, for that endpoint.
    #[test]
    fn every_documented_error_is_in_the_table() {
        let doc = document();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (_, operation) in item.as_object().unwrap() {
                for status in operation["responses"].as_object().unwrap().keys() {
                    let code: u16 = status.parse().unwrap();
                    if code < 400 {
                        continue;
                    }
                    assert!(
                        ERRORS.iter().any(|(s, endpoints, _)| *s == code
                            && (endpoints.contains(path.as_str())
                                || endpoints.starts_with("all")
                                || *endpoints == "any")),
                        "{path} documents {code}, which the error table lacks"
                    );
                }
            }
        }
        let description = doc["info"]["description"].as_str().unwrap();
        assert!(description.contains("| 422 | /restore |"), "{description}");
        assert_eq!(doc["x-error-table"].as_array().unwrap().len(), ERRORS.len());
    }
}
