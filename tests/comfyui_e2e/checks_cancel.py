"""Cancel → resume on the real server, the way a user does it (issue 12 §2).

1. An uninterrupted reference run of the CI training graph (tiny SD1.5, demo data: 3 epochs x 3 steps).
2. The same graph under another run name; after the Train node's second progress event, ``POST /interrupt`` (what
   the Cancel button sends). The prompt must end *interrupted*, with the checkpoint, ``state/`` and ``run.json``
   written for the step reached, and the node must report it (websocket ``executed`` text and the server log).
3. The same graph again with ``resume`` on: it must continue at the next step, finish, and its final LoRA must equal
   the reference run's, tensor for tensor (the CPU resume tests' tolerance: exact).
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

from run_stage import load_api_workflow, log_since, log_size
from watch import run_watched

WORKFLOW = "workflows/api/crucible_ci_train_tiny.json"
NEEDS = ("demo_data", "tiny_sd15")
EPOCHS, STEPS_PER_EPOCH = 3, 3  # 12 demo images / batch 4
TOTAL = EPOCHS * STEPS_PER_EPOCH
CANCEL_AFTER = 2  # progress value at which the Cancel is sent
TIMEOUT = 900.0
REPORT = re.compile(r"cancelled at step (\d+); saved (.+); queue again with resume on to continue")


def training_prompt(ctx, run_name: str, resume: bool = False) -> tuple[dict, str]:
    """The CI training graph on the stage's test data; returns (prompt, Train node id)."""
    prompt = copy.deepcopy(load_api_workflow(ctx.pack_dir / WORKFLOW))
    train_id = next(i for i, n in prompt.items() if n["class_type"] == "CrucibleTrain")
    for node in prompt.values():
        if node["class_type"] == "CrucibleModel":
            node["inputs"].update(ckpt_name=ctx.variables["tiny_sd15"], path="")
        elif node["class_type"] == "CrucibleDataset":
            node["inputs"].update(path=ctx.variables["demo_data"], resolution=64, repeats=1)
    prompt[train_id]["inputs"].update(run_name=run_name, epochs=EPOCHS, max_train_steps=0, batch_size=4,
                                      save_every_n_epochs=1, save_every_n_steps=0, checkpoint_limit=0,
                                      save_precision="fp32", sample_prompts="", resume=resume)
    return prompt, train_id


def manifest(ctx, run_name: str) -> dict:
    path = ctx.comfy_root / "output" / "crucible" / run_name / "run.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def lora_difference(a: Path, b: Path) -> list[str]:
    """Problems if the two LoRA files do not hold exactly the same tensors."""
    import torch
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    if ta.keys() != tb.keys():
        return [f"{a.name} and {b.name} hold different keys ({len(ta)} vs {len(tb)})"]
    differ = {k: float((ta[k].float() - tb[k].float()).abs().max()) for k in ta if not torch.equal(ta[k], tb[k])}
    if differ:
        worst = max(differ, key=differ.get)
        return [f"{len(differ)} of {len(ta)} tensors differ from the uninterrupted run's; worst {worst}: "
                f"max |Δ| {differ[worst]:.3g}"]
    return []


async def run_checks(ctx) -> None:
    results = ctx.results
    missing = [n for n in NEEDS if ctx.resources.get(n, {}).get("status") != "ok"]
    if missing:
        results.skip("cancel → resume", f"needs the stage resources {missing}")
        return
    if "CrucibleTrain" not in ctx.object_info:
        results.fail("cancel → resume", "CrucibleTrain is not on this server")
        return

    # 1. the uninterrupted reference
    ref_prompt, _ = training_prompt(ctx, "ci_cancel_reference")
    ref = await run_watched(ctx.server, ref_prompt, TIMEOUT)
    reference = manifest(ctx, "ci_cancel_reference")
    if not results.check("cancel → resume: uninterrupted reference run", [] if ref.succeeded and
                         len(reference.get("losses", [])) == TOTAL else [ref.describe()], f"{TOTAL} steps"):
        return

    # 2. Cancel after the second step
    run_name = "ci_cancel"
    prompt, train_id = training_prompt(ctx, run_name)
    sent = []

    def cancel_when_training(kind: str, data: dict) -> None:
        if kind == "progress" and str(data.get("node")) == train_id and data.get("value", 0) >= CANCEL_AFTER \
                and not sent:
            sent.append(ctx.server.request("/interrupt", {})[0])

    log_start = log_size(ctx.server_log)
    cancelled = await run_watched(ctx.server, prompt, TIMEOUT, cancel_when_training)
    logged = log_since(ctx.server_log, log_start)
    problems = []
    if not sent:
        problems.append(f"the Train node never reached step {CANCEL_AFTER}: {cancelled.describe()}")
    elif not cancelled.interrupted:
        problems.append(f"POST /interrupt (HTTP {sent[0]}) did not end the prompt as interrupted: "
                        f"{cancelled.describe()}")
    if not results.check("cancel: POST /interrupt during training ends the prompt interrupted", problems,
                         f"Cancel sent at step {CANCEL_AFTER}"):
        return

    saved = manifest(ctx, run_name)
    work = ctx.comfy_root / "output" / "crucible" / run_name
    checkpoints = saved.get("checkpoints", [])
    step = checkpoints[-1]["step"] if checkpoints else None
    problems = []
    if saved.get("status") != "cancelled":
        problems.append(f"run.json status {saved.get('status')!r}, expected 'cancelled' ({work / 'run.json'})")
    if step is None or not (CANCEL_AFTER <= step < TOTAL):
        problems.append(f"last checkpoint at step {step}, expected one for the step reached ({CANCEL_AFTER}..{TOTAL - 1})")
    else:
        if not Path(checkpoints[-1]["path"]).is_file():
            problems.append(f"the checkpoint {checkpoints[-1]['path']} is not on disk")
        state = work / "state" / "state.json"
        state_step = json.loads(state.read_text())["step"] if state.is_file() else None
        if state_step != step or not (work / "state" / "state.pt").is_file():
            problems.append(f"state/ holds step {state_step}, expected {step} (state.json + state.pt in {work / 'state'})")
        if len(saved.get("losses", [])) != step:
            problems.append(f"run.json has {len(saved.get('losses', []))} losses, expected {step}")
    if not results.check("cancel: checkpoint, state/ and run.json saved for the step reached", problems,
                         f"step {step} of {TOTAL}"):
        return

    texts = cancelled.texts(train_id)
    matches = [m for m in (REPORT.search(t) for t in texts) if m]
    problems = []
    if not matches or int(matches[-1].group(1)) != step:
        problems.append(f"no 'executed' report 'cancelled at step {step}; saved …; queue again with resume on to "
                        f"continue' for node {train_id}; texts sent: {texts}")
    elif Path(checkpoints[-1]["path"]).name not in matches[-1].group(2):
        problems.append(f"the report names {matches[-1].group(2)!r}, not the checkpoint saved")
    if f"cancelled at step {step}; saved" not in logged:
        problems.append("the server log has no '[Crucible] cancelled at step …' line")
    results.check("cancel: the node's report and ComfyUI's log say what was saved", problems,
                  texts[-1] if texts else "")

    # 3. resume
    resume_prompt, _ = training_prompt(ctx, run_name, resume=True)
    resumed = await run_watched(ctx.server, resume_prompt, TIMEOUT)
    final = manifest(ctx, run_name)
    steps_seen = [v for v in resumed.progress(train_id) if v > 0]
    problems = []
    if not resumed.succeeded:
        problems.append(f"the resumed prompt did not succeed: {resumed.describe()}")
    else:
        if not steps_seen or steps_seen[0] != step + 1:
            problems.append(f"progress after resume starts at {steps_seen[:1]}, expected step {step + 1}")
        if final.get("status") != "finished" or len(final.get("losses", [])) != TOTAL:
            problems.append(f"run.json after resume: status {final.get('status')!r}, "
                            f"{len(final.get('losses', []))} losses (expected 'finished', {TOTAL})")
        if not any(t.startswith(f"{len(final.get('checkpoints', []))} checkpoints") for t in resumed.texts(train_id)):
            problems.append(f"the node's report after resume: {resumed.texts(train_id)}")
    if not results.check("resume: queued again with resume on, it continues at the next step", problems,
                         f"steps {steps_seen[:1]}..{steps_seen[-1:]}"):
        return

    problems = []
    if final.get("losses") != reference.get("losses"):
        problems.append(f"losses differ from the uninterrupted run's:\n{final.get('losses')}\n{reference.get('losses')}")
    problems += lora_difference(Path(final["checkpoints"][-1]["path"]), Path(reference["checkpoints"][-1]["path"]))
    results.check("resume: the final LoRA equals the uninterrupted run's", problems,
                  f"{Path(final['checkpoints'][-1]['path']).name}, every tensor equal")
