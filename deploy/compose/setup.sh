#!/bin/sh
# One-shot setup for compose.yaml, run in the coordinator image as root (it
# hands every file to the fedge user, uid 10001, at the end): a CA and server certificate on first start, a one-time token per agent
# that has none yet, and (for this demo only) digits data split over the agents.
set -eu
data=/var/lib/fedge
shared=/shared
agents="${FEDGE_AGENTS:-agent-1 agent-2 agent-3}"
rm -f "$shared/ready"
if [ ! -f "$data/ca/ca.key" ]; then
    fedge ca init --data-dir "$data" >/dev/null
    fedge ca issue-server --data-dir "$data" --host localhost --ip 127.0.0.1 >/dev/null
fi
cp "$data/ca/ca.crt" "$shared/ca.crt"
mkdir -p "$shared/tokens"
for agent in $agents; do
    if [ ! -f "$shared/tokens/$agent" ]; then
        fedge token create --data-dir "$data" --device-id "$agent" --expires 7d 2>/dev/null \
            | head -n 1 > "$shared/tokens/$agent"
    fi
done
if [ ! -f "$shared/data/test.npz" ]; then
    # shellcheck disable=SC2086  # the list is space-separated on purpose
    set -- $agents
    fedge data split --devices "$#" --out "$shared/data"
fi
chown -R 10001:10001 "$data" "$shared"
chmod -R go-rwx "$shared/tokens"
touch "$shared/ready"
echo "setup: CA, tokens and data ready"
