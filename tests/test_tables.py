"""Terminal tables read at 80 columns (a narrow terminal, or a log, which rich lays out at 80): no cell is cut to
`…`, and no column is cropped off the right edge."""

from rich.console import Console
from rich.table import Table

from overfill.bench import BenchConfig, run_bench
from overfill.demo.report import print_chat
from overfill.frontier.report import print_frontier
from overfill.terminal_tables import readable
from test_bench import pair  # noqa: F401  (the fixture)

WIDTH = 80


def assert_reads_at_80(text: str) -> None:
    assert "…" not in text
    assert max(map(len, text.splitlines())) <= WIDTH


def test_a_wide_table_is_folded_and_split_never_cut():
    table = Table(title="a table wider than the terminal")
    names = ["configuration", *[f"measure-{i}-with-a-long-name" for i in range(7)]]
    for name in names:
        table.add_column(name, justify="right")
    rows = [["overfill@int8+refresh16+compiled", *[f"{i}.25 [{i}.00-{i}.50]" for i in range(7)]],
            ["full", *["-" for _ in range(7)]]]
    for row in rows:
        table.add_row(*row)
    console = Console(width=WIDTH, record=True)
    console.print(readable(table))
    text = console.export_text()
    assert_reads_at_80(text)
    words = {word for line in text.splitlines() for word in line.replace("│", " ").replace("┃", " ").split()}
    for name in names[1:]:  # every column is there, its header whole (each part holds it at its width)
        assert name in words
    for cell in rows[0][1:]:
        assert cell.split()[1] in words
    assert "overfill@int8+refresh16+" in text  # the label keeps its first 24 characters on one line


def test_the_bench_tables_read_at_80_columns(pair, tmp_path):  # noqa: F811
    config = BenchConfig(out=str(tmp_path), prompt_len=24, new_tokens=6, new_tokens_sweep=0, prompt_len_sweep=0,
                         batch_sweep=(1, 2), sweep_new_tokens=4, repeats=2, sweep_repeats=1, warmup=0, overhead_steps=0,
                         threads=1, references=False, refresh_every=(4,), decoder_dtypes=("float32", "bfloat16"),
                         modes=("overfill", "full"), decode_steps="eager")
    console = Console(width=WIDTH, record=True)
    run_bench(config, console, model=pair)
    text = console.export_text()
    assert_reads_at_80(text)
    for name in ("overfill+refresh4", "overfill@bfloat16", "tokens/step", "end-to-end (s)"):  # the last columns too
        assert name in text


def test_the_demo_chat_tables_read_at_80_columns():
    reply = {"prefill_s": 0.12, "decode_s": 1.5, "compile_s": 0.0, "new_tokens": 40, "decode_tokens_per_s": 26.0,
             "text": "A reply long enough to need several lines at eighty columns, with one overlongwordthatmustfoldsomewhere."}
    chat = [{"prompt": "Why is the sky blue? " * 5, "replies": {mode: reply for mode in ("full", "speculative", "overfill")}}]
    console = Console(width=WIDTH, record=True)
    print_chat(console, chat)
    text = console.export_text()
    assert_reads_at_80(text)
    assert "speculative (decoder drafts 3, full model verifies)".split()[0] in text


def test_the_frontier_table_the_demo_prints_reads_at_80_columns(tmp_path):
    def point(name, ms, top1, accepted=None):
        return {"name": name, "decode_step": "compiled", "decode_ms_per_token": ms, "decode_ms_spread": {"min": ms, "max": ms + 1},
                "decode_ms_vs_full": ms / 30, "top1": top1, "first_divergence_mean": 12.5, "nll": 0.812, "accuracy": 0.4,
                "acceptance_rate": accepted, "tokens_per_full_pass": None if accepted is None else 2.4}
    points = [point("full", 30.0, 1.0), point("overfill", 12.0, 0.71), point("overfill@int8+refresh16", 14.0, 0.8),
              point("overfill+spec3/pruned", 25.0, 1.0, 0.6)]
    result = {"points": points, "frontier": ["overfill", "full"], "config": {"timing_prompts": 4, "repeats": 3},
              "data": {"examples": 20}, "environment": {"device": "cpu", "dtype": "float32"}, "seconds": 12.0,
              "files": ["frontier.json"]}
    console = Console(width=WIDTH, record=True)
    print_frontier(console, result, tmp_path)
    text = console.export_text()
    assert_reads_at_80(text)
    for name in ("overfill@int8+refresh16", "overfill+spec3/pruned", "tokens/full pass", "drafts accepted"):
        assert name in text
