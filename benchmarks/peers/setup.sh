#!/usr/bin/env bash
# Create one virtualenv per peer package, outside the repository, for side-by-side benchmarks.
#
#   bash benchmarks/peers/setup.sh            # all peers
#   bash benchmarks/peers/setup.sh mace       # only some: nequip allegro mace
#
# Venvs go to ${MLIP_BENCH_VENVS:-$HOME/.cache/mlip-bench}/<peer>-venv (1.3-1.5 GB each).
# Each peer gets its own venv because mace-torch pins e3nn 0.4.4 while nequip/allegro need 0.6.
# torch is installed FIRST and pinned, so that no peer pulls in a different (CUDA) torch.
# Idempotent: a venv whose peer already imports is left alone.
set -euo pipefail

VENVS="${MLIP_BENCH_VENVS:-$HOME/.cache/mlip-bench}"
TORCH_VERSION="${MLIP_BENCH_TORCH:-2.13.0}"
PYTHON="${PYTHON:-python3}"

# peer name -> "pip requirement|python module that proves it is installed"
declare -A SPEC=(
    [nequip]="nequip==0.19.1|nequip"
    [allegro]="nequip-allegro==0.8.3|allegro"
    [mace]="mace-torch==0.3.16|mace"
)

peers=("$@")
[ ${#peers[@]} -eq 0 ] && peers=(nequip allegro mace)

mkdir -p "$VENVS"
for peer in "${peers[@]}"; do
    spec="${SPEC[$peer]:?unknown peer $peer (choose from ${!SPEC[*]})}"
    req="${spec%%|*}"
    module="${spec##*|}"
    venv="$VENVS/$peer-venv"
    if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import $module, ase, torch" 2>/dev/null; then
        echo "[$peer] already installed in $venv"
        continue
    fi
    echo "[$peer] creating $venv"
    "$PYTHON" -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    "$venv/bin/pip" install --quiet "torch==$TORCH_VERSION"
    # Keep torch pinned while installing the peer: a resolver that wants another torch fails loudly.
    "$venv/bin/pip" install --quiet "$req" "ase==3.29.0" "torch==$TORCH_VERSION"
    "$venv/bin/python" -c "import $module, torch; print('[$peer] ok: torch', torch.__version__)"
done
