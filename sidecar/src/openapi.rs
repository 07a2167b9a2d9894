//! The OpenAPI 3.1 document of the sidecar API, served at `GET /openapi.json`.

use serde_json::{json, Value};

fn error_response(description: &str) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } })
}

/// The document.
pub fn document() -> Value {
    let name_param = json!([{ "name": "name", "in": "path", "required": true, "schema": { "type": "string" }, "description": "original container name" }]);
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "ums-sidecar",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The runtime container's agent: nested containers, checkpoint archives, live migration. Every endpoint but /healthz and /probe/{name} requires `Authorization: Bearer <token>` when the sidecar has a token file."
        },
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
                    "destinationToken": { "type": "string" },
                    "volumes": { "type": "object", "additionalProperties": false, "description": "pod volumes (by name) to carry besides the pod-local kinds (emptyDir, ephemeral), or pod-local ones to leave",
                        "properties": { "include": { "type": "array", "items": { "type": "string" } }, "exclude": { "type": "array", "items": { "type": "string" } } } } } },
                "MigrationReport": { "type": "object", "properties": {
                    "migrationId": { "type": "string" }, "destination": { "type": "string" }, "compression": { "type": "string" },
                    "sourceLeftRunning": { "type": "boolean" },
                    "containers": { "type": "array", "items": { "type": "object" } },
                    "volumes": { "type": "array", "items": { "type": "object", "properties": {
                        "name": { "type": "string" }, "kind": { "type": "string" }, "bytes": { "type": "integer" }, "entries": { "type": "integer" } } } },
                    "totals": { "type": "object", "properties": {
                        "bytesSent": { "type": "integer" }, "contentBytes": { "type": "integer" }, "preflightMs": { "type": "integer" },
                        "freezeDumpMs": { "type": "integer" }, "transferMs": { "type": "integer" }, "restoreMs": { "type": "integer" },
                        "downtimeMs": { "type": "integer" }, "totalMs": { "type": "integer" } } },
                    "cleanupWarnings": { "type": "array", "items": { "type": "string" } } } },
                "RestoreReport": { "type": "object", "properties": {
                    "migrationId": { "type": "string" }, "entries": { "type": "integer" }, "contentBytes": { "type": "integer" },
                    "receiveMs": { "type": "integer" }, "restoreMs": { "type": "integer" }, "containers": { "type": "array", "items": { "type": "object" } } } }
            }
        },
        "security": [{ "bearer": [] }],
        "paths": {
            "/healthz": { "get": { "summary": "liveness of the sidecar", "security": [], "responses": { "200": { "description": "ok" } } } },
            "/info": { "get": { "summary": "engine, CRIU, kernel, architecture, archive versions and compressions accepted", "responses": { "200": { "description": "sidecar info" }, "401": error_response("missing or wrong token") } } },
            "/containers": { "get": { "summary": "the nested containers", "responses": {
                "200": { "description": "list", "content": { "application/json": { "schema": { "type": "array", "items": { "$ref": "#/components/schemas/Container" } } } } },
                "401": error_response("missing or wrong token") } } },
            "/probe/{name}": { "get": { "summary": "state of one nested container, for the ambassador's probes", "security": [], "parameters": name_param,
                "responses": { "200": { "description": "running (or being migrated, or migrated away)" }, "204": { "description": "created, not started" },
                    "503": { "description": "exited; the body holds the exit code" }, "404": error_response("no such container") } } },
            "/create/{name}": { "post": { "summary": "create (and in active mode start) a nested container from migration-containers; idempotent", "parameters": name_param,
                "responses": { "201": { "description": "created" }, "200": { "description": "already there (or start mode null)" },
                    "404": error_response("not in migration-containers"), "409": error_response("migrated away"),
                    "422": error_response("spec cannot be run nested (image missing with imagePullPolicy Never, unresolved env, bad imagePullPolicy, ...)"),
                    "502": error_response("the nested engine failed (the image pull, naming the image and the registry's answer; or the engine's own error)"),
                    "503": error_response("start mode fail, or podinfo unreadable, or the nested engine unreachable") } } },
            "/stop": { "post": { "summary": "stop every nested container", "responses": { "200": { "description": "containers after stop" }, "409": error_response("busy") } } },
            "/logs/{name}": { "get": { "summary": "output of a nested container as NDJSON {stream, time, data}", "parameters": [
                    { "name": "name", "in": "path", "required": true, "schema": { "type": "string" } },
                    { "name": "follow", "in": "query", "schema": { "type": "boolean" } },
                    { "name": "after", "in": "query", "schema": { "type": "string" }, "description": "only lines after this UNIX time in nanoseconds (the `time` of the last line seen)" }],
                "responses": { "200": { "description": "stream", "content": { "application/x-ndjson": {} } }, "404": error_response("no such container") } } },
            "/checkpoint": { "post": { "summary": "freeze and dump the nested containers; the response body is the migration archive, streamed", "parameters": [
                    { "name": "container", "in": "query", "schema": { "type": "string" }, "description": "default: all" },
                    { "name": "leaveRunning", "in": "query", "schema": { "type": "boolean" } },
                    { "name": "compression", "in": "query", "schema": { "type": "string", "enum": ["none", "zstd"] } },
                    { "name": "includeVolumes", "in": "query", "schema": { "type": "string" }, "description": "comma-separated pod volumes to carry besides the pod-local ones" },
                    { "name": "excludeVolumes", "in": "query", "schema": { "type": "string" }, "description": "comma-separated pod-local volumes to leave" }],
                "responses": { "200": { "description": "archive", "content": { "application/x-tar": {} } }, "409": error_response("busy or nothing to checkpoint") } } },
            "/restore/preflight": { "post": { "summary": "would an archive from this source restore here now? (engine, CRIU, kernel, architecture, images, running containers)",
                "responses": { "200": { "description": "yes" }, "409": error_response("no, with the reasons in detail.problems") } } },
            "/restore": { "post": { "summary": "restore a migration archive (request body, streamed; Content-Encoding zstd accepted); answers when the containers run",
                "parameters": [{ "name": "migrationId", "in": "query", "schema": { "type": "string" } }],
                "requestBody": { "content": { "application/x-tar": {} } },
                "responses": { "200": { "description": "restored", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/RestoreReport" } } } },
                    "400": error_response("the body is not a valid tar stream, or ended early (names where it broke)"),
                    "409": error_response("busy, or a container already runs here"),
                    "422": error_response("archive refused, naming the entry or field: digest mismatch, unsafe path, unsupported format version, engine mismatch, bad manifest or trailer"),
                    "500": error_response("the sidecar could not write the archive to its staging directory"),
                    "502": error_response("the nested engine failed to restore a container, or it exited right after") } } },
            "/migrate": { "post": { "summary": "live-migrate the nested containers to a destination sidecar",
                "requestBody": { "required": true, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/MigrateRequest" } } } },
                "responses": { "200": { "description": "migrated", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/MigrationReport" } } } },
                    "400": error_response("bad request"), "409": error_response("a migration is already in progress, or the destination cannot restore"),
                    "502": error_response("the migration failed; detail says in which phase and how the source was brought back") } } },
            "/openapi.json": { "get": { "summary": "this document", "responses": { "200": { "description": "OpenAPI 3.1" } } } }
        }
    })
}
