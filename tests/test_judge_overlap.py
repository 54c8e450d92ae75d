"""--judge-overlap (issue 19, item 2): the judge's call runs on a thread while the log-probs of pi_t and pi_0 are
computed. Against the served stand-in annotator (conftest's `annotator`): a run gives the same metrics with and
without it, the step waits less than the judge took, and an annotator that stops answering stops the run with
the same message and checkpoint."""
import re
import socket

import pytest

import config
import judge
import loop
from conftest import TINY, comparable, read_metrics, train

def flags(toy_cache, url, out, overlap, steps=3):
    return TINY + ["--cache-dir", toy_cache, "--out-dir", str(out), "--steps", str(steps), "--save-every", "1000",
                   "--print-every", "1000", "--judge", "llm", "--judge-url", url, "--judge-patience", "1",
                   "--judge-timeout", "10", "--eval-judge", "toy_gold", "--judge-overlap", overlap]


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["dar", "grpo", "online_dpo --pair-labels preference"])
def test_overlap_changes_no_metric_and_hides_the_judge(toy_cache, annotator, tmp_path, algo):
    """Online DPO's preference labels (a second call, judge.prefer) are sent with the rewards' call and waited
    for after the log-probs too."""
    runs = {}
    for overlap in ("off", "on"):
        train(config.parse_config(flags(toy_cache, annotator, tmp_path / overlap, overlap) + ["--algo", *algo.split()]))
        runs[overlap] = read_metrics(tmp_path / overlap)
    assert len(runs["on"]) == 3
    assert comparable(runs["on"]) == comparable(runs["off"])  # rewards, losses, weights: equal, not close
    calls = ["judge"] + (["prefer"] if "preference" in algo else [])
    for row in runs["off"]:  # judged, then scored: the step waited the whole call
        assert all(row[f"perf/{c}_wait_s"] >= row[f"perf/{c}_s"] > 0 for c in calls)
    for row in runs["on"]:   # the log-probs ran during the calls: the wait after them is shorter than the calls
        assert row["perf/judge_wait_s"] < row["perf/judge_s"]
        assert sum(row[f"perf/{c}_wait_s"] for c in calls) < sum(row[f"perf/{c}_s"] for c in calls)
    if "preference" in algo:
        assert runs["on"][0]["pairs/used"] > 0  # the labels came from the annotator's preference prompt


class UnreachableAfter:
    """The annotator for `good` calls, then the same judge pointed at a port where nothing listens."""

    def __init__(self, inner, good):
        self.inner, self.good, self.calls = inner, good, 0

    def __call__(self, prompts, responses, ended):
        self.calls += 1
        if self.calls > self.good:
            with socket.socket() as s:  # a port that was free a moment ago: connection refused
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            self.inner.url = f"http://127.0.0.1:{port}/v1"
        return self.inner(prompts, responses, ended)


@pytest.mark.slow
def test_an_unreachable_annotator_stops_alike_with_overlap(toy_cache, annotator, tmp_path, monkeypatch):
    """Batch 2's requests are refused for the whole --judge-patience: with and without overlap the run stops before
    training on it, with the same message, the same checkpoint of batch 1 and the same metrics."""
    stops = {}
    for overlap in ("off", "on"):
        monkeypatch.setattr(loop, "make_judge", lambda *a, **k: UnreachableAfter(judge.make_judge(*a, **k), 1))
        out = tmp_path / overlap
        with pytest.raises(SystemExit) as e:
            train(config.parse_config(flags(toy_cache, annotator, out, overlap, steps=4)))
        stops[overlap] = (re.sub(r"127\.0\.0\.1:\d+", "HOST", str(e.value).replace(str(out), "OUT")),
                          (out / "latest").read_text(),
                          comparable(read_metrics(out)))
    msg, latest, rows = stops["on"]
    assert "online batch 2" in msg and "failed every try of a request for --judge-patience 1 s" in msg, msg
    assert "Connection refused" in msg and "--resume" in msg, msg
    assert latest.strip() == "ckpt-000001" and len(rows) == 1
    assert stops["on"] == stops["off"]


def test_judge_overlap_is_checked():
    with pytest.raises(SystemExit, match="--judge-overlap must be auto, on or off"):
        config.check_config(config.parse_config(["--judge-overlap", "yes"]), 1)
