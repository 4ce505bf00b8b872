"""Live progress display (rich) and the short end-of-run summary.

On a terminal a live bar shows the round in progress; when the output is not a
terminal (a pipe, a log file, a batch job) a live display prints nothing, so
one plain line per round is printed instead (``progress=false`` silences both).
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedfm.data.quality import summary_line


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


class RunProgress:
    """Round bar plus a line per evaluated round; silent when disabled."""

    def __init__(self, cfg, console: Console | None = None, enabled: bool = True) -> None:
        self.enabled = enabled
        self.console = console or Console(stderr=False)
        self.key = "perplexity" if cfg.model.task == "causal_lm" else "accuracy"
        self.rounds = cfg.federation.rounds
        self.cohort = cfg.federation.clients_per_round
        self._progress = None
        self._plain = False  # not a terminal: one plain line per round instead of the live bar

    def __enter__(self) -> "RunProgress":
        self._plain = self.enabled and not self.console.is_terminal
        if self.enabled and not self._plain:
            self._progress = Progress(
                TextColumn("[bold]round"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task("", total=self.rounds * self.cohort)
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None

    def print(self, *args, **kwargs) -> None:
        if self._plain:  # a log file: whole lines, not wrapped at the console width
            kwargs.setdefault("soft_wrap", True)
        if self.enabled:
            self.console.print(*args, **kwargs)

    def header(self, cfg, n_examples: int, n_test: int, stats: dict, trainable: int, total: int) -> None:
        self.print(
            f"[bold]fedfm[/bold] {cfg.name}: {cfg.model.method} on {cfg.model.name} ({cfg.model.task}), "
            f"{cfg.algorithm.name}, {cfg.federation.num_clients} clients ({cfg.federation.partition.scheme}), "
            f"{self.cohort}/round, {self.rounds} rounds"
        )
        skew = stats.get("label_skew_tv")
        skew_txt = f", label skew (TV) {skew:.2f}" if skew is not None else ""
        self.print(
            f"  data: {n_examples} examples, {n_test} global test; client train sizes "
            f"{stats['size_min']}-{stats['size_max']} (mean {stats['size_mean']:.1f}){skew_txt}"
        )
        if "data_quality" in stats:  # data.quality: the clients' own filters, counts only
            self.print(f"  {summary_line(stats['data_quality'])}")
        self.print(f"  trainable state: {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")

    def client_done(self, cid: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task)

    def round_done(self, r: dict) -> None:
        if self._progress is not None:
            desc = f"loss {r['train_loss']:.3f}" if "train_loss" in r else ""
            if f"test_{self.key}" in r:
                desc += f"  test {self.key} {r[f'test_{self.key}']:.4g}"
            self._progress.update(self._task, description=desc)
        if self._plain and f"test_{self.key}" not in r and r.get("round", 0) > 0:
            loss = r.get("train_loss")
            loss_txt = f" | train loss {loss:.4f}" if isinstance(loss, float) and loss == loss else ""
            wall = f" | elapsed {r['wall_s']:.1f} s" if "wall_s" in r else ""
            self.print(f"  round {r['round']:>3}/{self.rounds}{loss_txt}{wall}")
        if f"test_{self.key}" in r:
            parts = [f"round {r['round']:>3}", f"test {self.key} {r[f'test_{self.key}']:.4f}", f"loss {r['test_loss']:.4f}"]
            if "test_prior_accuracy" in r:  # the majority-class baseline the accuracy is read against
                parts.append(f"prior {r['test_prior_accuracy']:.4f}")
            if f"client_{self.key}_mean" in r:
                parts.append(
                    f"clients mean {r[f'client_{self.key}_mean']:.4f} median {r[f'client_{self.key}_median']:.4f} "
                    f"worst10% {r[f'client_{self.key}_worst10']:.4f}"
                )
            if "backdoor_success_rate" in r:
                parts.append(f"backdoor {r['backdoor_success_rate']:.4f}")
            parts.append(f"up {_fmt_bytes(r['bytes_up_total'])} down {_fmt_bytes(r['bytes_down_total'])}")
            if "dp_epsilon" in r:
                parts.append(f"epsilon {r['dp_epsilon']:.3f}")
            if "dp_sgd_epsilon" in r:
                parts.append(f"DP-SGD max epsilon {r['dp_sgd_epsilon']:.3f}")
            self.print("  " + " | ".join(parts))

    def summary(self, s: dict) -> None:
        table = Table(title=f"fedfm summary: {s['name']}", show_header=False)
        key = s["metric"]
        value = s.get(f"final_{key}")
        table.add_row(f"final test {key}", "n/a" if value is None else f"{value:.4f}")
        if s.get("prior_accuracy") is not None:  # always the most frequent training label: read accuracy against it
            table.add_row("majority-class baseline", f"{s['prior_accuracy']:.4f}")
        fin = s["final"]
        if f"client_{key}_mean" in fin:
            left_out = s.get("clients_too_small") or 0
            table.add_row(
                f"client {key} mean / median / worst 10% / std",
                f"{fin[f'client_{key}_mean']:.4f} / {fin.get(f'client_{key}_median', float('nan')):.4f} / "
                f"{fin[f'client_{key}_worst10']:.4f} / {fin[f'client_{key}_std']:.4f}"
                + (f" ({s['clients_counted']} clients; {left_out} with < {s['min_client_test_examples']} test rows "
                   "left out)" if left_out else ""),
            )
        if s.get("backdoor_success_rate") is not None:
            table.add_row("backdoor success rate", f"{s['backdoor_success_rate']:.4f}")
        table.add_row("rounds", str(s["rounds"]) + (f" (stopped: {s['stop_reason']})" if s.get("stop_reason") else ""))
        p = s.get("privacy") or {}
        if "epsilon" in p:
            table.add_row("client-level DP (epsilon, delta)", f"({p['epsilon']:.3f}, {p['delta']:.1e}), noise multiplier {p['noise_multiplier']:.3f}")
        if "dp_sgd" in p:
            d = p["dp_sgd"]
            share = d.get("noise_share", 1.0)
            table.add_row(
                "DP-SGD max epsilon (delta)",
                f"{d['epsilon_max']:.3f} ({d['delta']:.1e}), noise multiplier {d['noise_multiplier']:.3f}, "
                f"clip {d['max_grad_norm']:g}, " + ("local noise" if share == 1 else f"distributed noise (share {share:.3f})"),
            )
        table.add_row("bytes up / down", f"{_fmt_bytes(s['bytes_up_total'])} / {_fmt_bytes(s['bytes_down_total'])}")
        table.add_row("trainable state", _fmt_bytes(s["trainable_state_bytes"]))
        if s["rejected_updates"]:
            table.add_row("rejected updates", str(s["rejected_updates"]))
        if s.get("data_quality"):  # the latest counts each participating client reported
            table.add_row("data quality (reported)", summary_line(s["data_quality"]).split(": ", 1)[1])
        table.add_row("wall time", f"{s['wall_s']:.1f} s")
        table.add_row("run folder", s["run_dir"])
        self.console.print(table)
