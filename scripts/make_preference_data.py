"""Generate the DPO and GRPO quickstart datasets from the quickstart's topic sentences.

- data/quickstart_dpo/{train,eval}.jsonl (format preference): the prompt asks for a sentence's topic;
  `chosen` is the right topic, `rejected` a wrong one drawn at random (every topic as often), so a
  model must know the topics to prefer `chosen`; the base SmolLM2-135M-Instruct often does not.
- data/quickstart_grpo/{train,eval}.jsonl (format prompt_only): the same question asking for a one-word
  answer, with the topic as `reference`; rewards (configs/quickstart-grpo.yaml) score the right topic
  word alone. The base answers in a sentence or with a wrong topic most of the time.
Deterministic (fixed seed).

    python scripts/make_preference_data.py
"""

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_quickstart_data import QUESTION, TOPICS, sentences  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
N_EVAL = 50
ONE_WORD = QUESTION.replace("?\n\n", "? Answer with one word.\n\n")


def main() -> None:
    rng = random.Random(1234)
    rows = sentences(rng)
    pairs, prompts = [], []
    for sentence, topic in rows:
        rejected = rng.choice([t for t in TOPICS if t != topic])
        prompt = [{"role": "user", "content": QUESTION.format(sentence=sentence)}]
        pairs.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": topic}],
                      "rejected": [{"role": "assistant", "content": rejected}]})
        prompts.append({"prompt": [{"role": "user", "content": ONE_WORD.format(sentence=sentence)}], "reference": topic})
    for folder, part in (("quickstart_dpo", pairs), ("quickstart_grpo", prompts)):
        out = ROOT / "data" / folder
        out.mkdir(parents=True, exist_ok=True)
        for name, chunk in (("eval", part[:N_EVAL]), ("train", part[N_EVAL:])):
            (out / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in chunk))
            print(f"wrote {len(chunk)} rows to {out / (name + '.jsonl')}")


if __name__ == "__main__":
    main()
