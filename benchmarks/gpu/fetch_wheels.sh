#!/usr/bin/env bash
# Download the simspec runtime dependencies a bare GPU machine may lack as wheels into .whl/
# (git-ignored) at the checkout root. Run on a machine WITH package access; carry .whl/ along with
# the checkout (device tool: carry [".whl"], 64 MiB in all). calibrate_and_validate.sh installs them
# with `pip install --no-index --find-links .whl ...` only if they are not importable already.
#
# What is needed: transformers already requires numpy, pyyaml and tqdm, so a machine with
# transformers has them; pyarrow is optional on the GPU run's code path (pandas uses it only if
# present); scipy and matplotlib are optional (numpy NNLS fallback; no PNG). That leaves click and
# simpy (pure python), and pandas (binary, one wheel per Python version) with its pure-python
# dependencies python-dateutil, six and tzdata: about 13 MB per Python version.
#
#   benchmarks/gpu/fetch_wheels.sh [PYTHON_VERSION ...]     # default: 3.10 3.11 3.12 3.13
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PIP=${PIP:-python3 -m pip}
VERSIONS=("$@"); [ ${#VERSIONS[@]} -eq 0 ] && VERSIONS=(3.10 3.11 3.12 3.13)
mkdir -p "$REPO/.whl"
$PIP download --dest "$REPO/.whl" --no-deps --only-binary=:all: click simpy python-dateutil six tzdata
for v in "${VERSIONS[@]}"; do
  $PIP download --dest "$REPO/.whl" --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 \
    --python-version "$v" --implementation cp pandas
done
du -sh "$REPO/.whl"
