#!/usr/bin/env bash
# Wheel check, as a pip user gets the zoo:
#  1. build the wheel from a clean copy of the tree;
#  2. resolve `pip install <wheel>` (no extras) against the index: none of the extras' packages;
#  3. install it into a fresh venv (no system site-packages, so the repo's editable install cannot
#     leak in) and build a zoo model through timm;
#  4. add the `train` extra and run the console scripts: zoo-train quickstart_digits for one epoch,
#     then zoo-test on its checkpoint, from a folder outside the repo.
# torch, torchvision and their CUDA wheels (5.5 GB) are not reinstalled: the venv sees the host's
# copies of those distributions only, through a folder of links (plain sys.path entries; the host's
# .pth files, the editable finder among them, are not processed).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
T="$(mktemp -d)"
trap 'rm -rf "$T"' EXIT
start=$SECONDS
NOT_CORE="mmengine pycocotools scikit-learn scipy matplotlib opencv-python opencv-python-headless nibabel h5py"

echo "== wheel check [$((SECONDS - start)) s]: build"
python - "$REPO" "$T/src" <<'EOF'
import shutil, sys
shutil.copytree(sys.argv[1], sys.argv[2], ignore=shutil.ignore_patterns(
    ".git", "build", "dist", "*.egg-info", "__pycache__", "work_dirs", ".pytest_cache", "data", "outputs"))
EOF
python -m pip wheel -q --no-deps --no-build-isolation -w "$T/dist" "$T/src"
WHEEL="$(ls "$T"/dist/attention_zoo-*.whl)"
echo "built $(basename "$WHEEL")"

echo "== wheel check [$((SECONDS - start)) s]: resolve the core install (pip install --dry-run --report)"
python -m pip install -q --dry-run --ignore-installed --report "$T/core.json" -c "$REPO/constraints.txt" "$WHEEL"
python - "$T/core.json" $NOT_CORE <<'EOF'
import json, sys
names = sorted(item["metadata"]["name"].lower() for item in json.load(open(sys.argv[1]))["install"])
print(f"core install resolves to {len(names)} distributions: {' '.join(names)}")
bad = sorted(set(names) & set(sys.argv[2:]))
if bad:
    sys.exit(f"the core install pulls {bad}")
EOF

echo "== wheel check [$((SECONDS - start)) s]: fresh venv"
python -m venv "$T/venv"
VPY="$T/venv/bin/python"
python - "$T/host" "$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" <<'EOF'
# Link the host's torch, torchvision and everything torch requires into one folder on the venv's path.
import os, sys
from importlib import metadata
from packaging.requirements import Requirement
host, venv_site = sys.argv[1], sys.argv[2]
os.makedirs(host)
todo, seen, linked = [("torch", ""), ("torchvision", "")], set(), set()
while todo:  # (distribution, extra) pairs: torch asks for cuda-toolkit[cublas,cudart,...]
    name, extra = todo.pop()
    dist = metadata.distribution(name)
    key = dist.metadata["Name"].lower()
    if (key, extra) in seen:
        continue
    seen.add((key, extra))
    if key != "torchvision":  # torchvision's own requirements (numpy, pillow) are installed for real
        for req in map(Requirement, dist.requires or []):
            if req.marker is None or req.marker.evaluate({"extra": extra}):
                todo += [(req.name, "")] + [(req.name, e) for e in req.extras]
    if key in linked:
        continue
    linked.add(key)
    for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}:
        src, dst = str(dist.locate_file(top)), os.path.join(host, top)
        if os.path.exists(src) and not os.path.lexists(dst):
            os.symlink(src, dst)
with open(os.path.join(venv_site, "_host_torch.pth"), "w") as f:
    f.write(host + "\n")
print(f"shared from the host: {' '.join(sorted(linked))}")
EOF
"$VPY" -m pip install -q -c "$REPO/constraints.txt" "$WHEEL"
mkdir "$T/run" && cd "$T/run"
"$VPY" - $NOT_CORE <<'EOF'
import json, subprocess, sys
names = sorted(d["name"].lower() for d in json.loads(subprocess.run(
    [sys.executable, "-m", "pip", "list", "--format", "json"], capture_output=True, text=True, check=True).stdout))
print(f"installed in the venv (no extras): {' '.join(names)}")
bad = sorted(set(names) & set(sys.argv[1:]))
if bad:
    sys.exit(f"the core install pulled {bad}")
import zoo, timm
assert zoo.__file__.startswith(sys.prefix), f"zoo imported from {zoo.__file__}, not from the venv"
model = timm.create_model("biformer_tiny")
print(f"timm.create_model('biformer_tiny') -> {type(model).__module__}.{type(model).__name__}")
EOF

echo "== wheel check [$((SECONDS - start)) s]: train extra, zoo-train and zoo-test"
"$VPY" -m pip install -q -c "$REPO/constraints.txt" "$WHEEL[train]"
"$T/venv/bin/zoo-train" --list-configs > "$T/configs.txt"
head -3 "$T/configs.txt"
"$T/venv/bin/zoo-train" quickstart_digits --work-dir "$T/run/wd" --cfg-options train_cfg.max_epochs=1
CKPT="$T/run/wd/epoch_1.pth"
test -f "$CKPT" || { echo "zoo-train wrote no $CKPT" >&2; ls -R "$T/run/wd" >&2; exit 1; }
"$T/venv/bin/zoo-test" quickstart_digits "$CKPT" --work-dir "$T/run/wd_test" | tee "$T/test.log"
grep -q '^metrics: {.*accuracy/top1' "$T/test.log"
echo "== wheel check passed in $((SECONDS - start)) s"
