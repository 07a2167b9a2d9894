#!/usr/bin/env bash
# Runs the admission webhook on this machine the way the API server would use it: makes a CA
# and serving certificate with `ums-certs` (into certs/out, never committed), starts
# `ums-webhook` on 127.0.0.1:8443 (admin on 127.0.0.1:8080), sends it UMS's memhog example as
# an AdmissionReview over HTTPS, and prints the decoded JSON patch and the wrapped pod.
# Leave it running with --keep.
set -euo pipefail
cd "$(dirname "$0")/.."
keep=0
[ "${1:-}" = "--keep" ] && keep=1

cargo build --quiet --locked -p ums-webhook -p ums-certs
target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
"$target/debug/ums-certs" --out certs/out --extra-name 127.0.0.1 --extra-name localhost

"$target/debug/ums-webhook" --listen 127.0.0.1:8443 --admin-listen 127.0.0.1:8080 \
  --tls-cert certs/out/tls.crt --tls-key certs/out/tls.key &
webhook=$!
trap 'kill $webhook 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  curl -fs http://127.0.0.1:8080/readyz >/dev/null 2>&1 && break
  sleep 0.1
done

review=$(python3 - <<'PY'
import json
pod = json.load(open("webhook/tests/data/memhog-dind.json"))
print(json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
  "uid": "0f4e5b52-0000-4000-8000-000000000001",
  "kind": {"group": "", "version": "v1", "kind": "Pod"},
  "resource": {"group": "", "version": "v1", "resource": "pods"},
  "name": "memhog", "namespace": "default", "operation": "CREATE",
  "userInfo": {"username": "kubernetes-admin"}, "object": pod, "dryRun": False}}))
PY
)
echo "--- POST https://127.0.0.1:8443/mutate (UMS memhog example, migration-interface: dind)"
response=$(curl -fsS --cacert certs/out/ca.crt -H 'content-type: application/json' \
  --data "$review" https://127.0.0.1:8443/mutate)
REVIEW="$review" RESPONSE="$response" python3 - <<'PY'
import base64, json, os
response = json.loads(os.environ["RESPONSE"])["response"]
print("allowed:", response["allowed"], " patchType:", response.get("patchType"))
patch = json.loads(base64.b64decode(response["patch"]))
print(f"--- JSON patch ({len(patch)} operations)")
for op in patch:
    value = json.dumps(op.get("value"))
    print(f'  {op["op"]:8} {op["path"]}  {value[:100]}{"..." if len(value) > 100 else ""}')
PY
echo "--- GET http://127.0.0.1:8080/metrics"
curl -fsS http://127.0.0.1:8080/metrics | grep '^ums_webhook_admission_requests_total'
if [ "$keep" = 1 ]; then
  echo "webhook running (pid $webhook); Ctrl-C to stop"
  wait $webhook
fi
