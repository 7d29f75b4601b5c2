"""The run folder: which stage is final, and refusals that say what to do."""

import pytest

from qllava.run import RunExistsError, RunFolder


def stage(root, name, complete=True):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "projector.safetensors").write_bytes(b"")
    if complete:
        (folder / "metrics.json").write_text("{}")
    return folder


def test_the_final_stage_is_the_last_complete_one(tmp_path):
    stage(tmp_path, "stage1")
    assert RunFolder(tmp_path).final_stage() == tmp_path / "stage1"
    stage(tmp_path, "stage2")
    assert RunFolder(tmp_path).final_stage() == tmp_path / "stage2"
    assert RunFolder.holds_run(tmp_path) and not RunFolder.holds_run(tmp_path / "stage2")


def test_an_unfinished_last_stage_is_not_skipped_silently(tmp_path):
    stage(tmp_path, "stage1")
    stage(tmp_path, "stage2", complete=False)  # training stopped: a projector from a checkpoint, no metrics.json
    with pytest.raises(
        FileNotFoundError,
        match=r"stage2 is not complete \(no metrics.json: training stopped before "
        r"the end\): finish it with `qllava finetune RECIPE --resume`",
    ):
        RunFolder(tmp_path).final_stage()


def test_a_folder_without_stages_is_not_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a qllava run folder: no complete stage1/ or stage2/"):
        RunFolder(tmp_path).final_stage()


def test_claim_replaces_only_with_overwrite(tmp_path):
    stage(tmp_path, "stage1")
    run = RunFolder(tmp_path)
    with pytest.raises(RunExistsError, match="stage1 exists: pass --overwrite to replace it"):
        run.claim(("stage1", "stage2"), overwrite=False, resume=False)
    stage(tmp_path, "stage2")
    with pytest.raises(RunExistsError, match="stage2 exist: pass --overwrite to replace them"):
        run.check_claim(("stage1", "stage2"), overwrite=False, resume=False)
    run.claim(("stage1",), overwrite=False, resume=True)
    assert run.complete("stage1")
    run.claim(("stage2",), overwrite=True, resume=False)
    assert run.complete("stage1")  # --stage 2 --overwrite keeps stage 1
    run.claim(("stage1",), overwrite=True, resume=False)
    assert not run.stage("stage1").exists()


def test_overwrite_takes_the_replaced_runs_eval_answers_with_it(tmp_path):
    stage(tmp_path, "stage1")
    run = RunFolder(tmp_path)
    run.eval_dir.mkdir()
    (run.eval_dir / "vqa-eval.jsonl").write_text('{"question_id": 1, "text": "red"}\n')
    run.claim(("stage1",), overwrite=False, resume=True)
    assert run.eval_dir.exists()  # --resume keeps the run, and its answers
    run.claim(("stage1",), overwrite=True, resume=False)
    assert not run.eval_dir.exists()  # the answers were the replaced model's: the next eval would refuse them
