"""How `qlora merge` prints its verification: the merged model against base + adapter (evaluate/drift.py)
and the GGUF file against the merged checkpoint (export/gguf_check.py)."""

from __future__ import annotations

from rich.table import Table


def drift_table(check: dict) -> Table:
    """The merge verification: the judged comparison, and drift from the model as trained when that differs."""
    columns = [("judged: vs " + check["merge_exactness"]["reference"], check["merge_exactness"])]
    if check["model_as_trained"] != check["merge_exactness"]:
        columns.append(("reported: vs " + check["model_as_trained"]["reference"], check["model_as_trained"]))
    result = "[green]PASS[/]" if check["passed"] else "[red]FAIL[/]"
    table = Table(title=f"verification: {result} ({check['rows']} eval rows, {check['compute_dtype']} compute)", title_justify="left")
    table.add_column("")
    for title, _ in columns:
        table.add_column(title, justify="right")
    greedy = lambda g: f"{g['identical']}/{g['prompts']} identical" if g else "n/a"  # noqa: E731
    response = lambda f: "n/a" if f["top1_agreement_response"] is None else f"{100 * f['top1_agreement_response']:.2f}%"  # noqa: E731
    rows = {
        "top-1 agreement (all positions)": lambda f: f"{100 * f['top1_agreement']:.2f}% of {f['positions']:,}",
        "top-1 agreement (response tokens)": response,
        "mean KL": lambda f: f"{f['mean_kl']:.2e}",
        "max abs logit diff": lambda f: f"{f['max_abs_logit_diff']:.4g}",
        "greedy generations": lambda f: greedy(f.get("greedy")) if "greedy" in f else "-",
    }
    for name, cell in rows.items():
        table.add_row(name, *(cell(figures) for _, figures in columns))
    limits = check["thresholds"]
    table.caption = f"fails below top-1 {limits['min_top1_agreement']:.1%} or above mean KL {limits['max_mean_kl']:.0e} (judged column)"
    table.caption_justify = "left"
    return table


def gguf_table(exported: dict) -> Table:
    """The GGUF file and its load-back check against the merged checkpoint."""
    check = exported.get("verification")
    verdicts = [part["passed"] for part in (check, exported.get("llamacpp")) if part and part.get("passed") is not None]
    result = "" if not verdicts else (": [green]PASS[/]" if all(verdicts) else ": [red]FAIL[/]")
    table = Table(title=f"GGUF {exported['file']}{result}", title_justify="left", show_header=False)
    table.add_column("")
    table.add_column("", justify="right")
    tokenizer = exported["tokenizer"]
    table.add_row("size", f"{exported['bytes'] / 2**20:.1f} MiB ({exported['gguf_type']}, {exported['architecture']})")
    if "adapter" in exported:
        adapter = exported["adapter"]
        table.add_row("LoRA adapter", f"{adapter['file']}: {adapter['bytes'] / 2**20:.1f} MiB, {adapter['tensors']} tensors, rank {adapter['rank']}")
    table.add_row("tokenizer", f"{tokenizer['model']} / pre {tokenizer['pre']}, {tokenizer['tokens']:,} tokens, "
                  f"chat template {'yes' if tokenizer['chat_template'] else 'no'}")
    if check:
        logits, tokens = check["logits"], check["tokenizer"]
        bound = "reported; judged in llama.cpp" if check["min_top1_agreement"] is None else f"min {100 * check['min_top1_agreement']:.0f}%"
        table.add_row("top-1 agreement vs merged", f"{100 * logits['top1_agreement']:.2f}% of {logits['positions']:,} ({bound})")
        table.add_row("max abs logit diff / mean KL", f"{logits['max_abs_logit_diff']:.4g} / {logits['mean_kl']:.2e}")
        probe = check.get("position_probe")
        if probe:
            past = probe["top1_agreement_response"] if probe["window"] else probe["top1_agreement"]
            where = f", past its window of {probe['window']}" if probe["window"] else ""
            bound = "reported" if check["probe_min_top1_agreement"] is None else f"min {100 * check['probe_min_top1_agreement']:.0f}%"
            table.add_row(f"top-1 on a {probe['tokens']:,}-token row{where}", f"{100 * past:.2f}% ({bound})")
        table.add_row("tokenizer round trip", f"{tokens['identical']}/{tokens['texts']} identical, chat template "
                      f"{'equal' if tokens['chat_template_equal'] else 'DIFFERS'}")
    llama = exported.get("llamacpp")
    if llama and not llama.get("skipped") and "tokenization" not in llama:
        table.add_row("llama.cpp", f"[red]FAIL[/] ({llama['failures'][0][:120]})")
    elif llama and not llama.get("skipped"):
        verdict = "[green]PASS[/]" if llama["passed"] else "[red]FAIL[/]"
        tokens = llama["tokenization"]
        table.add_row("llama.cpp", f"{verdict} ({llama['runtime']})")
        explained = f", {tokens['explained']} split apart as llama.cpp does (vulgar fractions)" if tokens["explained"] else ""
        table.add_row("  tokenization vs transformers", f"{tokens['identical']}/{tokens['texts']} strings identical{explained}")
        if llama["rows"]:
            table.add_row("  greedy answers = merged model", f"{100 * llama['greedy_agreement']:.0f}% of {llama['rows']} rows")
            table.add_row("  exact match (merged model)", f"{100 * llama['exact_match']:.0f}% ({100 * llama['merged_exact_match']:.0f}%)")
            table.add_row("  stopped at end of turn (merged)", f"{llama['stopped']}/{llama['rows']} ({llama['merged_stopped']}/{llama['rows']})")
    modelfile = exported.get("modelfile")
    if modelfile:
        state = "TEMPLATE verified" if modelfile["template"] else "no TEMPLATE"
        compared = f" on {modelfile['conversations_equal']}/{modelfile['conversations']} conversations" if "conversations" in modelfile else ""
        table.add_row("Ollama Modelfile", f"{state}{compared}, stop {', '.join(modelfile['stop'])}")
    return table
