"""jee1 eval on the tiny model: task files in every format (with malformed rows), the scoring math
against llama.cpp's own logits, the KL gate, resume, reports."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import run_convert, running_engine
from jee1.edge.cli import main as jee1_cli
from jee1.edge.eval.prompting import FewshotSampler, PromptStyle
from jee1.edge.eval.runner import EvalConfig, read_records, evaluate
from jee1.edge.eval.scoring import LoglikScorer, log_softmax, parse_answer
from jee1.edge.eval.stats import mcnemar_exact, wilson_interval
from jee1.edge.eval.tasks import read_task
from jee1.errors import InputError
from jee1.llama_backend import load_llama
from jee1.quality import compare

REPO = Path(__file__).resolve().parents[1]
MEDQA = [
    ("Which enzyme does aspirin inhibit?", ["Cyclooxygenase", "Lipase", "Amylase", "Trypsin"], "A"),
    ("What is the antidote for heparin?", ["Vitamin K", "Protamine sulfate", "Naloxone", "Flumazenil"], "B"),
    ("First-line treatment for anaphylaxis?", ["Antihistamine", "Steroid", "Intramuscular adrenaline", "Salbutamol"], "C"),
    ("Which vitamin deficiency causes scurvy?", ["Vitamin A", "Vitamin B12", "Vitamin D", "Vitamin C"], "D"),
    ("Which drug reverses opioid overdose?", ["Naloxone", "Atropine", "Glucagon", "Digoxin"], "A"),
    ("What lowers serum urate long term in gout?", ["Colchicine", "Allopurinol", "Ibuprofen", "Prednisolone"], "B"),
]


def write_medqa(path, rows, bad=True):
    with open(path, "w") as f:
        for q, opts, ans in rows:
            f.write(json.dumps({"question": q, "options": dict(zip("ABCD", opts)), "answer_idx": ans}) + "\n")
        if bad:
            f.write('{"question": "three options only", "options": {"A": "x", "B": "y", "D": "z"}, "answer_idx": "A"}\n')
            f.write("this line is not json\n")
            f.write(json.dumps({"question": "bad answer", "options": dict(zip("ABCD", "wxyz")), "answer_idx": "E"}) + "\n")
    return path


def write_pubmedqa(path):
    data = {"101": {"QUESTION": "Does metformin lower HbA1c?",
                    "CONTEXTS": ["Metformin lowers hepatic glucose output.", "In trials HbA1c fell by 1%."],
                    "final_decision": "yes"},
            "102": {"QUESTION": "Is aspirin an antibiotic?", "CONTEXTS": ["Aspirin inhibits cyclooxygenase."],
                    "final_decision": "no"},
            "103": {"QUESTION": "Does coffee cure gout?", "CONTEXTS": ["Evidence is mixed."], "final_decision": "maybe"},
            "104": {"QUESTION": "Broken", "CONTEXTS": "not a list", "final_decision": "yes"}}
    path.write_text(json.dumps(data))
    return path


def write_usmle(path):
    with open(path, "w") as f:
        f.write(json.dumps({"id": "s1-1", "step": 1, "question": "Which organ makes insulin?",
                            "options": {"A": "Liver", "B": "Pancreas", "C": "Kidney", "D": "Spleen", "E": "Lung"},
                            "answer": "B"}) + "\n")
        f.write(json.dumps({"id": "s2-1", "step": 2, "question": "Which drug is first-line in type 2 diabetes?",
                            "options": {"A": "Metformin", "B": "Insulin", "C": "Sulfonylurea"}, "answer": "A"}) + "\n")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    return {"medqa": write_medqa(d / "medqa.jsonl", MEDQA), "pubmedqa": write_pubmedqa(d / "pubmedqa.json"),
            "usmle": write_usmle(d / "usmle.jsonl"), "shots": write_medqa(d / "shots.jsonl", MEDQA[::-1], bad=False)}


def test_readers_report_malformed_rows_with_their_place(files):
    medqa = read_task("medqa", files["medqa"], strict=False)
    assert len(medqa.items) == 6 and len(medqa.bad_rows) == 3
    assert [row.split(": ")[0].rsplit(":", 1)[1] for row in medqa.bad_rows] == ["7", "8", "9"]
    assert "lettered A.. without gaps" in medqa.bad_rows[0] and "'answer_idx' is 'E'" in medqa.bad_rows[2]
    pubmed = read_task("pubmedqa", files["pubmedqa"], strict=False)
    assert len(pubmed.items) == 3 and "PMID 104" in pubmed.bad_rows[0]
    usmle = read_task("usmle", files["usmle"], strict=False)
    assert [i.labels for i in usmle.items] == [tuple("ABCDE"), tuple("ABC")] and usmle.items[0].id == "s1-1"
    with pytest.raises(InputError, match="3 malformed row"):
        read_task("medqa", files["medqa"], strict=True)


def test_harness_layouts_match_lm_evaluation_harness(files):
    item = read_task("medqa", files["medqa"], strict=False).items[0]
    prompt = PromptStyle("harness").build(item, [])
    assert prompt.context == ("Question: Which enzyme does aspirin inhibit?\nA. Cyclooxygenase\nB. Lipase\n"
                              "C. Amylase\nD. Trypsin\nAnswer:")
    assert prompt.continuations == (" A", " B", " C", " D")
    pub = read_task("pubmedqa", files["pubmedqa"], strict=False).items[0]
    p = PromptStyle("harness").build(pub, [])
    # the paragraphs joined with a newline, as lm-evaluation-harness's preprocess_pubmedqa joins them
    assert p.context == ("Abstract: Metformin lowers hepatic glucose output.\nIn trials HbA1c fell by 1%."
                         "\nQuestion: Does metformin lower HbA1c?\nAnswer:")
    assert p.continuations == (" yes", " no", " maybe")


def test_fewshot_draws_as_the_harness_sampler_does(files):
    """lm-evaluation-harness: random.Random(seed) per task; for each question in turn sample(pool, k),
    or sample(pool, k + 1) minus the question when the examples come from the task's own file."""
    import random

    pool = read_task("medqa", files["shots"], strict=False).items
    questions = read_task("medqa", files["medqa"], strict=False).items
    sampler = FewshotSampler(pool, 3, seed=1234, same_file=False)
    rnd = random.Random(1234)
    draws = [sampler.draw(q) for q in questions]
    assert draws == [rnd.sample(pool, 3) for _ in questions]
    assert len({tuple(s.id for s in d) for d in draws}) > 1          # questions get different examples
    own = FewshotSampler(pool, 3, seed=1234, same_file=True)
    rnd = random.Random(1234)
    for item in pool:
        want = [s for s in rnd.sample(pool, 4) if s != item][:3]
        got = own.draw(item)
        assert got == want and item not in got
    with pytest.raises(InputError, match="needs 9 examples"):
        FewshotSampler(pool, 9, seed=7, same_file=False)


def test_acc_norm_divides_by_the_choice_length_as_the_harness_does(eval_engine, files):
    """PubMedQA's choices differ in length (yes 3, no 2, maybe 5 characters, without the leading
    space): predicted_norm is the argmax of log-likelihood over those lengths."""
    from jee1.edge.eval.scoring import LoglikScorer

    item = read_task("pubmedqa", files["pubmedqa"], strict=False).items[0]
    prompt = PromptStyle("harness").build(item, [])
    with eval_engine._lock:
        scored = LoglikScorer(eval_engine.llama).score(prompt, item)
    norm = [lp / len(label) for lp, label in zip(scored.logprobs, item.labels)]
    assert scored.predicted_norm == item.labels[norm.index(max(norm))]


@pytest.fixture(scope="module")
def eval_engine(tmp_path_factory, q4_merged):
    with running_engine(tmp_path_factory.mktemp("eval-engine"), q4_merged.output, safety={"pre_model": False}) as eng:
        yield eng


def test_loglik_equals_a_direct_computation_from_llama_cpp_logits(eval_engine, files, q4_merged):
    items = read_task("medqa", files["medqa"], strict=False).items[:3]
    style = PromptStyle("harness")
    scorer = LoglikScorer(eval_engine.llama)
    direct = load_llama(q4_merged.output, n_ctx=1024, n_threads=2, logits_all=True, seed=0)
    try:
        for item in items:
            prompt = style.build(item, [])
            with eval_engine._lock:
                scored = scorer.score(prompt, item)
            for label, continuation, ours in zip(item.labels, prompt.continuations, scored.logprobs, strict=True):
                context = direct.tokenize(prompt.context.encode(), add_bos=True, special=False)
                cont = scorer.continuation_tokens(context, prompt.context, continuation)
                direct.reset()
                direct._ctx.kv_cache_seq_rm(-1, 0, -1)
                direct.eval(context + cont)
                logits = np.asarray(direct.scores[:len(context) + len(cont)], dtype=np.float64)
                expected = sum(log_softmax(logits[len(context) - 1 + j])[t] for j, t in enumerate(cont))
                assert ours == pytest.approx(expected, abs=2e-3), (item.id, label)
            assert scored.predicted == item.labels[int(np.argmax(scored.logprobs))]
    finally:
        direct.close()


def test_shared_prompt_cache_changes_nothing_but_speed(eval_engine, files):
    items = read_task("pubmedqa", files["pubmedqa"], strict=False).items
    style = PromptStyle("harness")
    with eval_engine._lock:
        cached = [LoglikScorer(eval_engine.llama, reuse_cache=True).score(style.build(i, []), i).logprobs for i in items]
        fresh = [LoglikScorer(eval_engine.llama, reuse_cache=False).score(style.build(i, []), i).logprobs for i in items]
    np.testing.assert_allclose(cached, fresh, atol=2e-3)


@pytest.mark.parametrize("text,expected", [("C", "C"), (" C. Amylase", "C"), ("(B) Lipase", "B"),
                                           ("The answer is D", "D"), ("c", "C"), ("Cyclooxygenase", None),
                                           ("E", None), ("", None), ("I think A", None)])
def test_generated_answers_are_parsed_strictly(files, text, expected):
    item = read_task("medqa", files["medqa"], strict=False).items[0]
    assert parse_answer(text, item) == expected


def test_generated_decisions_are_parsed_strictly(files):
    item = read_task("pubmedqa", files["pubmedqa"], strict=False).items[0]
    assert [parse_answer(t, item) for t in ["Yes, it does.", "maybe", "Probably yes", "no."]] == ["yes", "maybe", None, "no"]


def run_cli(*args):
    result = CliRunner().invoke(jee1_cli, ["-q", "eval", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result


def common(tmp_path, model):
    return [model, "--cache-dir", tmp_path / "cache", "--audit-log", tmp_path / "audit.jsonl", "--ctx", "1024"]


def test_eval_cli_writes_results_report_plot_and_says_safety_was_off(tmp_path, files, q4_merged):
    out = tmp_path / "out"
    run_cli(*common(tmp_path, q4_merged.output), "--task", "medqa", files["medqa"], "--task", "pubmedqa",
            files["pubmedqa"], "--task", "usmle", files["usmle"], "--fewshot", "medqa", files["shots"],
            "--fewshot", "pubmedqa", files["pubmedqa"], "--fewshot", "usmle", files["usmle"], "-k", "1", "--out", out)
    results = json.loads((out / "results.json").read_text())
    run = results["runs"][0]
    assert run["pre_model_safety"] is False and run["k_shot"] == 1 and run["mode"] == "loglik"
    medqa = run["tasks"]["medqa"]
    assert medqa["n"] == 6 and len(medqa["malformed_rows"]) == 3 and 0 <= medqa["acc"] <= 1
    assert medqa["acc_ci95"][0] <= medqa["acc"] <= medqa["acc_ci95"][1] and "acc_norm" in medqa
    assert medqa["prompt_example"].count("Question:") == 2          # one shot + the question, saved
    report = (out / "report.md").read_text()
    assert "Clinical Camel-70B (published, five-shot, not measured here) | 60.7 | 77.9 | 64.3" in report
    assert "short-circuit was OFF" in report
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_generate_mode_counts_unparseable(tmp_path, files, q4_merged):
    out = tmp_path / "out"
    run_cli(*common(tmp_path, q4_merged.output), "--task", "medqa", files["medqa"], "--mode", "generate", "--out", out)
    medqa = json.loads((out / "results.json").read_text())["runs"][0]["tasks"]["medqa"]
    run = json.loads((out / "results.json").read_text())["runs"][0]
    records = [json.loads(line) for line in (out / run["records"]).read_text().splitlines()]
    assert medqa["unparseable"] == sum(r["predicted"] is None for r in records) and len(records) == 6
    assert all(r["correct"] is False for r in records if r["predicted"] is None)


def test_resume_gives_the_same_result_as_an_uninterrupted_run(tmp_path, files, eval_engine):
    config = EvalConfig([("medqa", files["medqa"]), ("pubmedqa", files["pubmedqa"])], tmp_path / "full", quiet=True)
    full = evaluate(eval_engine, config, "model")
    partial_dir = tmp_path / "partial"
    partial_dir.mkdir()
    lines = (tmp_path / "full" / full["records"]).read_text().splitlines(keepends=True)
    (partial_dir / full["records"]).write_text("".join(lines[:4]) + lines[4][:17])  # cut mid-record
    resumed = evaluate(eval_engine, EvalConfig(config.tasks, partial_dir, quiet=True), "model")
    assert resumed["records"] == full["records"]
    for task in ("medqa", "pubmedqa"):
        a, b = full["tasks"][task], resumed["tasks"][task]
        assert (a["correct"], a["acc"], a["correct_norm"]) == (b["correct"], b["acc"], b["correct_norm"])
    assert (read_records(partial_dir / full["records"]).keys()
            == read_records(tmp_path / "full" / full["records"]).keys())


def test_a_second_model_or_setting_never_reuses_another_runs_records(tmp_path, files, f16_merged, q4_merged):
    """Eval B into the --out of an earlier run of A: B's own answers, in its own records file."""
    out = tmp_path / "out"
    run_cli(*common(tmp_path, f16_merged.output), "--task", "medqa", files["medqa"], "--out", out)
    first = json.loads((out / "results.json").read_text())["runs"][0]
    run_cli(*common(tmp_path, q4_merged.output), "--task", "medqa", files["medqa"], "--out", out)
    second = json.loads((out / "results.json").read_text())["runs"][0]
    assert first["records"] != second["records"] and first["run_key"] != second["run_key"]
    a = read_records(out / first["records"])
    b = read_records(out / second["records"])
    assert a.keys() == b.keys()
    assert any(a[key]["logprobs"] != b[key]["logprobs"] for key in a)    # measured, not copied
    # same model, another setting (one shot): a third file; the first is untouched
    before = (out / first["records"]).read_bytes()
    run_cli(*common(tmp_path, f16_merged.output), "--task", "medqa", files["medqa"], "--fewshot", "medqa",
            files["shots"], "-k", "1", "--out", out)
    third = json.loads((out / "results.json").read_text())["runs"][0]
    assert third["records"] not in (first["records"], second["records"])
    assert (out / first["records"]).read_bytes() == before


def test_kl_of_a_model_against_itself_is_zero_and_against_a_quantized_copy_positive(tmp_path, f16_merged, q4_merged):
    text = (REPO / "convert" / "data" / "medical_corpus.txt").read_text()
    same = compare(f16_merged.output, f16_merged.output, text)
    assert same.kl_max < 1e-6 and same.top1_agreement == 1.0 and same.ppl_reference == pytest.approx(same.ppl_candidate)
    q4 = compare(f16_merged.output, q4_merged.output, text)
    assert q4.kl_mean > 0.01 and q4.top1_agreement < 1.0 and q4.tokens_scored == same.tokens_scored > 1000
    assert q4.kl_median <= q4.kl_p99 <= q4.kl_max


def test_eval_cli_kl_and_paired_comparison(tmp_path, files, f16_merged, q4_merged):
    out = tmp_path / "out"
    text = tmp_path / "text.txt"
    shutil.copy(REPO / "convert" / "data" / "medical_corpus.txt", text)
    run_cli(*common(tmp_path, q4_merged.output), "--reference", f16_merged.output, "--text", text,
            "--task", "medqa", files["medqa"], "--out", out)
    results = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in results["runs"]] == ["reference", "model"]
    paired = results["paired"]["medqa"]
    assert paired["n"] == 6 and 0 <= paired["mcnemar_p"] <= 1
    assert results["kl"]["kl_mean"] > 0 and "McNemar" in (out / "report.md").read_text()


def test_eval_cli_errors():
    runner = CliRunner()
    assert runner.invoke(jee1_cli, ["eval", "m.gguf"]).exit_code == 1
    result = runner.invoke(jee1_cli, ["eval", "m.gguf", "--text", "t.txt"])
    assert result.exit_code == 1 and "--text needs --reference" in result.output
    result = runner.invoke(jee1_cli, ["eval", "a.gguf", "--model", "b.gguf", "--task", "medqa", "t.jsonl"])
    assert result.exit_code == 1 and "give the model once" in result.output     # not silently ignored


def test_stats():
    low, high = wilson_interval(60, 100)
    assert low == pytest.approx(0.502, abs=1e-3) and high == pytest.approx(0.691, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(1, 9) == pytest.approx(0.021484375)


def test_published_figures_ship_with_the_package():
    packaged = REPO / "edge" / "eval" / "data" / "published_results.json"
    assert json.loads(packaged.read_text()) == json.loads((REPO / "docs" / "published_results.json").read_text())


def test_convert_quality_gate_passes_q8_and_records_it(tmp_path, tiny_base, tiny_adapter):
    result = run_convert(tiny_base, tmp_path / "q8.gguf", "Q8_0", tiny_adapter, verify_against_f16=True)
    gate = result.manifest_data["quality_gate"]
    assert gate["kl_mean"] < 0.01 and gate["top1_agreement"] > 0.9 and gate["max_kl_mean"] == 0.10


def test_convert_quality_gate_fails_and_keeps_nothing(tmp_path, tiny_base, tiny_adapter):
    from jee1.errors import VerificationError

    with pytest.raises(VerificationError, match="fails the quality gate"):
        run_convert(tiny_base, tmp_path / "q4.gguf", "Q4_K_M", tiny_adapter, verify_against_f16=True, max_kl=0.05)
    assert list(tmp_path.iterdir()) == []


def test_chat_style_uses_the_models_template(tmp_path, files, eval_engine):
    item = read_task("medqa", files["medqa"], strict=False).items[0]
    style = PromptStyle("chat", eval_engine.metadata["tokenizer.chat_template"], "Answer truthfully.")
    prompt = style.build(item, [])
    assert prompt.context.startswith("Below is an instruction that describes a task")
    assert "### Instruction:\nAnswer truthfully." in prompt.context
    assert prompt.context.endswith("D. Trypsin\nAnswer with the letter of the correct option only.\n\n### Response:\n")
    assert prompt.continuations == ("A", "B", "C", "D")
    result = evaluate(eval_engine, EvalConfig([("medqa", files["medqa"])], tmp_path, style="chat", quiet=True), "chat")
    medqa = result["tasks"]["medqa"]
    assert result["style"] == "chat" and medqa["n"] == 6 and "### Response:" in medqa["prompt_example"]


def test_chat_fewshot_examples_end_with_the_real_eos_token(eval_engine, files):
    """The template's eos_token after each few-shot answer is the model's EOS id, not '</s>' as text."""
    from jee1.edge.eval.scoring import LoglikScorer
    from jee1.prompts import load_template

    template = load_template("medalpaca")[1]
    shots = read_task("medqa", files["shots"], strict=False).items[:2]
    item = read_task("medqa", files["medqa"], strict=False).items[0]
    prompt = PromptStyle("chat", template).build(item, shots)
    assert prompt.context.count("</s>") == 2 and prompt.special_tokens
    llama = eval_engine.llama
    tokens = LoglikScorer(llama)._tokens(prompt.context, bos=True, special=prompt.special_tokens)
    as_text = llama.tokenize(b"</s>", add_bos=False, special=False)
    assert tokens.count(llama.token_eos()) == 2 and tokens.count(llama.token_bos()) == 1
    assert not any(tokens[i:i + len(as_text)] == as_text for i in range(len(tokens)))
    harness = PromptStyle("harness").build(item, shots)
    assert not harness.special_tokens and "</s>" not in harness.context


def test_base_row_is_measured_beside_the_model_with_the_paired_test(tmp_path, files, tiny_base, f16_merged):
    """SM70 against its own base: the base converted without --adapter is the --reference; the
    report shows both measured rows, the paired test under them, then the published rows."""
    from conftest import run_convert

    base = run_convert(tiny_base, tmp_path / "base.F16.gguf", "F16").output
    out = tmp_path / "out"
    run_cli(*common(tmp_path, f16_merged.output), "--reference", base, "--task", "medqa", files["medqa"],
            "--task", "pubmedqa", files["pubmedqa"], "--out", out)
    report_md = (out / "report.md").read_text()
    rows = [line for line in report_md.splitlines() if line.startswith("| ")]
    assert rows[1].startswith("| reference: base.F16.gguf") and rows[2].startswith("| model: tiny.F16.gguf")
    assert rows[3].startswith("| paired: reference vs model") and "McNemar p = " in rows[3]
    assert "(published, five-shot, not measured here)" in rows[4]
    assert "malformed rows skipped: MedQA-USMLE 3, PubMedQA 1" in report_md
    assert "chance level: MedQA-USMLE 25.0%, PubMedQA 33.3%" in report_md
    results = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in results["runs"]] == ["reference", "model"]
    assert results["runs"][0]["tasks"]["medqa"]["chance"] == 0.25
    assert (out / "accuracy.png").stat().st_size > 10_000


def test_bad_eval_inputs_cost_a_second_not_a_model_load(tmp_path, files, f16_merged):
    """Missing task file, too few few-shot examples: exit 1 before the model is verified or loaded
    (a real process; the cache folder, where verification would write, is never created)."""
    import subprocess
    import sys

    jee1 = Path(sys.executable).parent / "jee1"
    base = [jee1, "-q", "eval", f16_merged.output, "--cache-dir", tmp_path / "cache", "--audit-log",
            tmp_path / "audit.jsonl", "--out", tmp_path / "out"]
    cases = [(["--task", "medqa", tmp_path / "typo.jsonl"], "typo.jsonl: no such file"),
             (["--task", "medqa", files["medqa"], "--fewshot", "medqa", files["shots"], "-k", "99"],
              "99-shot needs 99 examples")]
    for args, message in cases:
        result = subprocess.run([*map(str, base), *map(str, args)], capture_output=True, text=True, timeout=120)
        assert result.returncode == 1 and message in result.stderr, result.stderr
        assert not (tmp_path / "cache").exists()
