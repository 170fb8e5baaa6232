"""Generate the DPO and GRPO quickstart datasets from the quickstart's topic sentences.

- data/quickstart_dpo/{train,eval}.jsonl (format preference): the prompt asks for a sentence's topic;
  `chosen` is the right topic, `rejected` the wrong topic the base SmolLM2-135M-Instruct scores
  highest (its most tempting mistake,
  by the first token's log-probability), so the base prefers `rejected` on most pairs.
- data/quickstart_grpo/{train,eval}.jsonl (format prompt_only): the same question with the topic as
  `reference`; rewards (configs/quickstart-grpo.yaml) score a terse, correct answer.
Deterministic (fixed seed, the base scored in fp32); needs the demo model (`qlora demo-model`).

    python scripts/make_preference_data.py
"""

import json
import random
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_quickstart_data import QUESTION, TOPICS, sentences  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
N_EVAL = 50


@torch.no_grad()
def topic_logps(model, tokenizer, sentence: str) -> dict[str, float]:
    """log p(first token of each topic | question) under the model: one forward per sentence (every
    topic's first token is distinct, and `qlora evaluate` measures the base on whole answers anyway)."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION.format(sentence=sentence)}], tokenize=False, add_generation_prompt=True)
    prompt_ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    logprobs = model(prompt_ids, logits_to_keep=1).logits[0, -1].float().log_softmax(-1)
    return {topic: float(logprobs[tokenizer(topic, add_special_tokens=False)["input_ids"][0]]) for topic in TOPICS}


def main() -> None:
    rng = random.Random(1234)
    rows = sentences(rng)
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    torch.set_num_threads(1)
    pairs, prompts = [], []
    for number, (sentence, topic) in enumerate(rows):
        if number % 100 == 0:
            print(f"scored {number}/{len(rows)} sentences", flush=True)
        scores = topic_logps(model, tokenizer, sentence)
        tempting = max((t for t in TOPICS if t != topic), key=scores.get)
        prompt = [{"role": "user", "content": QUESTION.format(sentence=sentence)}]
        pairs.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": topic}],
                      "rejected": [{"role": "assistant", "content": tempting}]})
        prompts.append({"prompt": prompt, "reference": topic})
    for folder, part in (("quickstart_dpo", pairs), ("quickstart_grpo", prompts)):
        out = ROOT / "data" / folder
        out.mkdir(parents=True, exist_ok=True)
        for name, chunk in (("eval", part[:N_EVAL]), ("train", part[N_EVAL:])):
            (out / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in chunk))
            print(f"wrote {len(chunk)} rows to {out / (name + '.jsonl')}")


if __name__ == "__main__":
    main()
