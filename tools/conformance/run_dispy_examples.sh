#!/bin/bash
# Run dispy's own examples (py3/examples/*.py, fetched by fetch_suites.sh)
# as they are, `import dispy` giving dpool (shim/dispy.py).
# usage: tools/conformance/run_dispy_examples.sh local|node
#   local: each example on its own embedded node, all at once;
#   node:  one dpool-node on a free loopback port, the examples in turn.
# Outputs: $DPOOL_SUITES/dispy_run/out_MODE_EXAMPLE.log; one line per example.
# sshportfw.py (a fixed remote address) is left out.
here=$(cd "$(dirname "$0")" && pwd)
suites=${DPOOL_SUITES:-/tmp/dpool-suites}
mode=${1:-local}
rm -rf "$suites/dispy_run" && cp -r "$suites/dispy_examples" "$suites/dispy_run" || exit 1
cd "$suites/dispy_run" || exit 1
for i in 0 1 2 3; do head -c 100000 /dev/urandom > data00$i; done  # job_scheduler.py's
export PYTHONPATH="$here/shim:$PYTHONPATH"
node_pid=
if [ "$mode" = node ]; then
    export EX_SECRET=dispy-examples-secret  # (16+ bytes: no WeakSecretWarning)
    DPOOL_SECRET=$EX_SECRET python -m dpool.daemons.node --port 0 --cpus 2 > node.out 2> node.err &
    node_pid=$!
    for _ in $(seq 300); do grep -q serving node.out 2>/dev/null && break; sleep 0.2; done
    EX_NODES=127.0.0.1:$(head -1 node.out | awk '{print $6}' | sed 's/.*://')
    export EX_NODES
    echo "node $EX_NODES"
fi
feed() {  # job_scheduler.py and longrun.py read commands: "quit" after 25 s
    case $1 in job_scheduler.py|longrun.py) sleep 25; echo quit;; esac
}
run_one() {
    local ex=$1 start
    start=$(date +%s)
    feed "$ex" | timeout "${EX_TIMEOUT:-300}" python "$ex" > "out_${mode}_$ex.log" 2>&1
    echo "$ex rc=$? $(( $(date +%s) - start ))s"
}
for ex in $(ls *.py | grep -v -e sshportfw -e node_update_script); do
    if [ "$mode" = node ]; then run_one "$ex"; else run_one "$ex" & fi
done
if [ -n "$node_pid" ]; then
    kill -INT "$node_pid"; wait "$node_pid"
else
    wait  # (the local examples)
fi
