# Sourced by the scripts run on a lent GPU machine (gpu_check.sh, gpu_closed_loop.sh): the machine's own
# python3 and packages, plus the wheels carried in folder $1 (benchmarks/gpu_prepare.sh downloads them),
# installed once per call into /tmp/site, which goes on PYTHONPATH ahead of the checkout.
#   carried_wheels FOLDER LOG   (returns 1 when the install fails; its output is in LOG)
carried_wheels() {
    local folder=$1 log=$2
    if compgen -G "$folder/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "$folder"/*.whl >>"$log" 2>&1 || return 1
        export PYTHONPATH=/tmp/site:$PWD
    else
        export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    fi
}
