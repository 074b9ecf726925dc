"""Data preparation speed: align's load + convert + render + mask against TRL's own preparation.

    python bench/data_prep.py [--model tiny-llama] [--rows 50000] [--max-length 1024]

Builds an alpaca file of ~50k rows from the real alpaca-format files in ../shared/external (repeated to
the size asked; the demo data when that folder is absent), then, in one process and with cold caches:

* align: read the file through `datasets`, convert each row to a conversation, render it with the chat
  template, mark the assistant tokens, drop or cut what does not fit (`align.prepare.prepare`);
* TRL: SFTTrainer's dataset preparation (tokenize with the chat template and `assistant_only_loss`,
  build labels, truncate) of the same rows, already converted to `messages` for it (TRL has no alpaca
  reader), with the same tokenizer. A chat template without `{% generation %}` marks (SmolLM2's) cannot
  serve `assistant_only_loss`: TRL then gets prompt/completion pairs (`completion_only_loss`).

Both sides use the tokenizer and chat template of `--model` (default the tiny Llama's byte-level BPE;
`smollm2` gives a real 49k-token vocabulary: see common.py). Prints rows/s and tokens/s for each, and checks
that both produced the same token ids.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from common import add_model_argument, has_generation_tags, model_folder

REPO = Path(__file__).resolve().parents[1]
EXTERNAL = REPO.parent / "shared" / "external"
SOURCES = [
    EXTERNAL / "llama-factory" / "data" / "alpaca_en_demo.json",
    EXTERNAL / "alpaca-data-cleaned" / "gsm_8k_train_alpaca.json",
    EXTERNAL / "alpaca-data-cleaned" / "gpteacher_roleplay-simple-deduped.json",
    EXTERNAL / "alpaca-data-cleaned" / "gpteacher_toolformer-similarity-0.6.json",
]


def build_file(rows: int, folder: Path) -> Path:
    base = []
    for source in SOURCES if EXTERNAL.is_dir() else [REPO / "datasets" / "demo_sft.json"]:
        base += [{k: r[k] for k in ("instruction", "input", "output")} for r in json.loads(source.read_text())]
    data = (base * (rows // len(base) + 1))[:rows]
    path = folder / "alpaca_bench.json"
    path.write_text(json.dumps(data))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(parser)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--max-length", type=int, default=1024)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="align-bench-"))
    os.environ["HF_HOME"] = str(work / "hf")  # cold caches for both sides
    os.environ.setdefault("ALIGN_HOME", str(work / "align"))

    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from align.kinds import CONVERSATIONS
    from align.plugin_manager import get_plugin_manager
    from align.prepare import prepare
    from align.render import Renderer

    datasets.disable_progress_bars()
    pm = get_plugin_manager()
    model_dir = model_folder(args.model)
    path = build_file(args.rows, work)
    megabytes = path.stat().st_size / 1e6
    print(f"{args.rows} alpaca rows ({megabytes:.1f} MB), tokenizer of {args.model}, max_length {args.max_length}")

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    started = time.perf_counter()
    prepared = prepare(str(path), Renderer(tokenizer, args.max_length), pm, kind=CONVERSATIONS)
    align_seconds = time.perf_counter() - started
    align_ids = prepared.train["input_ids"]

    # TRL gets the same rows as conversations; the conversion is not timed. A chat template without
    # {% generation %} marks (SmolLM2's) cannot serve assistant_only_loss: TRL then gets prompt/completion
    # pairs and masks the prompt through completion_only_loss.
    marked = has_generation_tags(tokenizer)
    rows = json.loads(path.read_text())

    def conversation(r: dict) -> dict:
        user = {"role": "user", "content": f"{r['instruction']}\n{r['input']}" if r["input"] else r["instruction"]}
        reply = {"role": "assistant", "content": r["output"]}
        return {"messages": [user, reply]} if marked else {"prompt": [user], "completion": [reply]}

    messages = [conversation(r) for r in rows]
    messages_file = work / "messages.jsonl"
    messages_file.write_text("\n".join(json.dumps(m) for m in messages))
    config = SFTConfig(
        output_dir=str(work / "trl"),
        max_length=args.max_length,
        assistant_only_loss=marked,
        completion_only_loss=None if marked else True,
        use_cpu=True,
        bf16=False,
        report_to=[],
        dataset_num_proc=None,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    started = time.perf_counter()
    dataset = datasets.load_dataset("json", data_files=str(messages_file), split="train")
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    trl_seconds = time.perf_counter() - started
    trl_ids = trainer.train_dataset["input_ids"]

    def line(name: str, seconds: float, ids: list[list[int]]) -> str:
        tokens = sum(len(i) for i in ids)
        speed = f"{args.rows / seconds:9.0f} rows/s  {tokens / seconds:11.0f} tokens/s"
        return f"  {name:5s} {seconds:7.2f} s  {speed}  ({len(ids)} rows kept)"

    print(line("align", align_seconds, align_ids))
    print(line("TRL", trl_seconds, trl_ids))
    print(f"  align takes {align_seconds / trl_seconds:.2f}x TRL's time")
    kept_by_trl = {tuple(i) for i in trl_ids}
    same = sum(1 for ids in align_ids if tuple(ids) in kept_by_trl)
    print(f"  {same} of align's {len(align_ids)} rows have exactly TRL's token ids")


if __name__ == "__main__":
    main()
