"""Build real AngelSlim fixture checkpoints: a tiny Qwen3 quantized by AngelSlim with each PTQ method.

Run with the isolated venv (it has torch, transformers, tokenizers and angelslim):

    .venv-angelslim/bin/python tools/angelslim/make_fixtures.py [--dest tests/fixtures/angelslim]

Steps: write a calibration JSONL (make_calib.py), build a byte-level BPE tokenizer and a tiny Qwen3 from a
fixed seed (offline, nothing from the Hub), save it as bf16, run run_ptq.py once per method in a scratch dir,
then copy each result (and the original) into `<dest>/<method>/` and write `<dest>/MANIFEST.json` with
versions, the command, per-method status/timings, file sha256 and the tensor listing of every safetensors.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
from make_calib import train_topics, write_calibration_jsonl  # noqa: E402

METHODS = ("fp8_static", "fp8_dynamic", "int8_dynamic", "int4_gptq", "int4_awq", "w4a8_fp8")
SEED = 1234
MAX_FIXTURE_BYTES = 1_000_000
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML, as Qwen uses; AngelSlim renders `messages` calibration lines with it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Tiny but quantizable: every Linear has in-features that are multiples of 128 (group size 128).
MODEL_SHAPE = {
    "vocab_size": 320,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "max_position_embeddings": 512,
}
# Files worth keeping from an AngelSlim output dir (others, e.g. our run report, stay in the scratch dir).
KEEP_SUFFIXES = (".json", ".safetensors", ".jinja", ".yaml", ".txt")
SKIP_NAMES = {"run_ptq_report.json"}
# Fields of run_ptq.py's report copied into MANIFEST.json.
REPORT_KEYS = (
    "status", "exit_code", "timings_s", "cuda_calls_redirected_to_cpu", "awq_search_to_calls_copied", "error"
)


def build_tokenizer(out: Path) -> Any:
    """Train a deterministic byte-level BPE on the calibration topics and save it as an HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=MODEL_SHAPE["vocab_size"],
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((text for _, text in train_topics()), trainer=trainer)
    if tokenizer.get_vocab_size() > MODEL_SHAPE["vocab_size"]:
        raise ValueError(f"tokenizer has {tokenizer.get_vocab_size()} tokens > vocab {MODEL_SHAPE['vocab_size']}")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def build_model(out: Path, tokenizer: Any) -> None:
    """Save a randomly initialised (fixed seed) bf16 Qwen3ForCausalLM to `out`."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(SEED)
    config = Qwen3Config(
        **MODEL_SHAPE,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    # Norm weights start at exactly 1.0; perturb them so that folding (AWQ) shows up as a change.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn_like(param))
    model.config.torch_dtype = torch.bfloat16
    model.save_pretrained(out, safe_serialization=True)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tensor_listing(path: Path) -> dict[str, dict[str, Any]]:
    """name -> {dtype, shape} for every tensor of a safetensors file, read from its header only."""
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_len])
    return {
        name: {"dtype": info["dtype"], "shape": info["shape"]}
        for name, info in sorted(header.items())
        if name != "__metadata__"
    }


def anonymise_paths(path: Path, replacements: dict[str, str]) -> None:
    """Replace scratch-dir absolute paths in a text file by stable placeholders."""
    text = path.read_text(encoding="utf-8")
    for old, new in replacements.items():
        text = text.replace(old, new)
    path.write_text(text, encoding="utf-8")


def copy_output(source: Path, dest: Path, replacements: dict[str, str]) -> dict[str, Any]:
    """Copy the kept files of one output dir to `dest`; return its manifest entry (files, tensors)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for path in sorted(source.iterdir()):
        if path.is_file() and path.suffix in KEEP_SUFFIXES and path.name not in SKIP_NAMES:
            shutil.copy2(path, dest / path.name)
            if path.suffix in {".json", ".yaml"}:
                anonymise_paths(dest / path.name, replacements)
    files = {path.name: sha256_file(path) for path in sorted(dest.iterdir())}
    size = sum(path.stat().st_size for path in dest.iterdir())
    if size >= MAX_FIXTURE_BYTES:
        raise ValueError(f"fixture dir {dest} is {size} bytes, over the {MAX_FIXTURE_BYTES} limit")
    tensors = {name: tensor_listing(dest / name) for name in files if name.endswith(".safetensors")}
    return {"bytes": size, "files": files, "tensors": tensors}


def run_method(python: str, model: Path, method: str, out: Path, calib: Path, args: argparse.Namespace) -> dict:
    """Run run_ptq.py for one method in a subprocess; return its report (status, timings, error)."""
    command = [
        python, str(HERE / "run_ptq.py"), "--model", str(model), "--method", method, "--out", str(out),
        "--calib", str(calib), "--num-samples", str(args.num_samples), "--seq-len", str(args.seq_len),
    ]
    completed = subprocess.run(command, capture_output=True, text=True)
    (out.parent / f"{method}.log").write_text(completed.stdout + completed.stderr, encoding="utf-8")
    report_path = out / "run_ptq_report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {"status": "failed"}
    report["exit_code"] = completed.returncode
    if completed.returncode != 0 and "error" not in report:
        report["error"] = {"message": completed.stderr.strip().splitlines()[-1:] or ["(no stderr)"]}
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description="Build AngelSlim fixture checkpoints.")
    parser.add_argument("--dest", type=Path, default=REPO / "tests" / "fixtures" / "angelslim")
    parser.add_argument("--python", default=sys.executable, help="python of the angelslim venv")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--work", type=Path, default=None, help="scratch dir (default: a temp dir)")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="angelslim-fixtures-"))
    work.mkdir(parents=True, exist_ok=True)
    calib = work / "calib.jsonl"
    original = work / "original"
    write_calibration_jsonl(calib)
    tokenizer = build_tokenizer(original)
    build_model(original, tokenizer)

    replacements = {str(work.resolve()): "<work>"}
    manifest: dict[str, Any] = {
        "angelslim": importlib.metadata.version("angelslim"),
        "torch": importlib.metadata.version("torch"),
        "transformers": importlib.metadata.version("transformers"),
        "environment": "bash tools/angelslim/build_env.sh .venv-angelslim",
        "command": (
            ".venv-angelslim/bin/python tools/angelslim/make_fixtures.py"
            f" --num-samples {args.num_samples} --seq-len {args.seq_len}"
        ),
        "seed": SEED,
        "model_shape": MODEL_SHAPE,
        "calibration": "tools/angelslim/make_calib.py: pydoc_data.topics, sorted keys, first 85%, messages lines",
        "original": copy_output(original, args.dest / "original", replacements),
        "methods": {},
    }
    failures = 0
    for method in args.methods:
        out = work / method
        report = run_method(args.python, original, method, out, calib, args)
        entry: dict[str, Any] = {
            key: report.get(key)
            for key in REPORT_KEYS
            if report.get(key) is not None
        }
        if report.get("status") == "ok":
            entry.update(copy_output(out, args.dest / method, replacements))
        else:
            failures += 1
            shutil.rmtree(args.dest / method, ignore_errors=True)
        manifest["methods"][method] = entry
        print(f"{method}: {entry.get('status')} {entry.get('timings_s')} {entry.get('error', '')}")
    (args.dest / "MANIFEST.json").write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    print(f"fixtures in {args.dest}; scratch in {work}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
