"""Hostile ``/prompt`` requests against the real server (issue 13): nobody in, and one string never stops the queue.

Run by ``run_stage.py`` after the workflows (``async def run_checks(ctx)``; alone: ``CRUCIBLE_ONLY_CHECKS=hostile
bash .ci/comfyui_stage.sh``). Files with a secret marker are planted outside every allowed folder (beside the
ComfyUI tree, in a temp folder, in a pickle that writes a file when unpickled). Then each case posts a prompt and
checks:

* the refusal: the prompt is rejected by ComfyUI's validation (400), or fails with an execution error whose text
  contains the expected message (a case may only pass as "refused by ComfyUI" where noted);
* no leak: the marker is not in the response, the prompt's history or the server log it produced, and no pickle
  ran;
* the queue is alive: a normal prompt (Crucible Dataset on the demo data, with a fresh input so it really runs)
  succeeds afterwards.

At the end, no file containing the marker is in ComfyUI's output/models folders, and no new file appeared outside
ComfyUI's input/output/models/user/temp folders. The cases are listed in docs/reliability.md.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
import uuid
from pathlib import Path

from run_stage import Run, StageContext, log_since, log_size, mentions_all, run_prompt

SECRET = "crucible-hostile-secret-" + uuid.uuid4().hex[:8]
TIMEOUT = 180.0
ALIVE_TIMEOUT = 90.0
COMFY_WRITABLE = ("input", "output", "models", "user", "temp")  # where ComfyUI itself may create files


class Pwn:
    """Unpickling this creates ``path``: stands in for any code a crafted pickle would run."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class Hostile:
    """The planted files, the prompt builders and the per-case checks."""

    def __init__(self, ctx: StageContext):
        self.ctx = ctx
        self.root = ctx.comfy_root
        self.outside = self.root.parent / "hostile-private"  # beside the ComfyUI tree: outside every allowed folder
        self.tmp = Path(tempfile.mkdtemp(prefix="crucible-hostile-"))
        self.pwned = [self.outside / "pwned", self.tmp / "pwned"]
        self.alive_count = 0
        self.stuck = False
        self.refused_by_comfy: list[str] = []

    # --- planting ------------------------------------------------------------------------------------------------
    def plant(self) -> None:
        self.outside.mkdir(exist_ok=True)
        for folder in (self.outside, self.tmp):
            (folder / "secret.txt").write_text(SECRET + "\n", encoding="utf-8")
            (folder / "secret.safetensors").write_bytes(_safetensors_with(SECRET))
            data = folder / "dataset" / "10_secret"
            demo = self.root / "input" / self.var("demo_data", "crucible_demo")
            if demo.is_dir():
                shutil.copytree(demo, folder / "dataset", dirs_exist_ok=True)
                data = next(p for p in (folder / "dataset").iterdir() if p.is_dir())
            data.mkdir(parents=True, exist_ok=True)
            for caption in data.glob("*.txt"):
                caption.write_text(f"{SECRET}, leaked", encoding="utf-8")
        # a pickle in an allowed folder: refused without being unpickled
        ckpts = self.root / "models" / "checkpoints"
        ckpts.mkdir(parents=True, exist_ok=True)
        (ckpts / "hostile_pickle.ckpt").write_bytes(pickle.dumps({"state_dict": Pwn(self.pwned[0])}))
        (ckpts / "hostile_pickle_renamed.safetensors").write_bytes(pickle.dumps({"w": Pwn(self.pwned[0])}))
        # the caption_extension exploit: image a.png and a folder a.d beside it (both uploadable through /upload)
        cap = self.root / "input" / "hostile_cap"
        cap.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.any_png(), cap / "a.png")
        (cap / "a.d").mkdir(exist_ok=True)
        # symlinks out of the input folder: the folder itself, a concept folder, one caption file
        self.link(self.root / "input" / "hostile_link", self.outside / "dataset")
        mixed = self.root / "input" / "hostile_mixed"
        shutil.copytree(self.root / "input" / self.var("demo_data", "crucible_demo"), mixed, dirs_exist_ok=True)
        self.link(mixed / "5_stolen", next(p for p in (self.outside / "dataset").iterdir() if p.is_dir()))
        capfile = self.root / "input" / "hostile_capfile"
        shutil.copytree(self.root / "input" / self.var("demo_data", "crucible_demo"), capfile, dirs_exist_ok=True)
        victim = sorted(capfile.rglob("*.txt"))[0]
        victim.unlink()
        self.link(victim, self.outside / "secret.txt")

    def any_png(self) -> Path:
        return next((self.root / "input" / self.var("demo_data", "crucible_demo")).rglob("*.png"))

    @staticmethod
    def link(at: Path, to: Path) -> None:
        if at.is_symlink() or at.exists():
            return
        at.symlink_to(to, target_is_directory=to.is_dir())

    def var(self, name: str, default: str = "") -> str:
        return str(self.ctx.variables.get(name, default))

    def snapshot(self) -> set[Path]:
        """Files beside and inside the ComfyUI tree, except where ComfyUI itself writes."""
        skip = {self.root / d for d in COMFY_WRITABLE} | {self.outside}
        found = set()
        for base, dirs, files in os.walk(self.root.parent):
            here = Path(base)
            dirs[:] = [d for d in dirs if here / d not in skip and d != "__pycache__"]
            found |= {here / f for f in files}
        return found

    # --- prompts -------------------------------------------------------------------------------------------------
    def node(self, class_type: str, **inputs) -> dict:
        """``class_type`` with every required widget at its default (from /object_info), then ``inputs``."""
        info = self.ctx.object_info.get(class_type, {}).get("input", {})
        values = {}
        for name, spec in info.get("required", {}).items():
            kind, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
            if isinstance(kind, list):
                values[name] = opts.get("default", kind[0] if kind else "")
            elif kind == "COMBO":
                values[name] = opts.get("default", (opts.get("options") or [""])[0])
            elif "default" in opts:
                values[name] = opts["default"]
        values.update(inputs)
        return {"class_type": class_type, "inputs": values}

    def dataset(self, **inputs) -> dict:
        return self.node("CrucibleDataset", **{"path": self.var("demo_data", "crucible_demo"), "resolution": 64,
                                               **inputs})

    def producers(self) -> dict[str, dict]:
        """A genuine node for every custom socket type a forged case does not forge (not the run)."""
        return {
            "CRUCIBLE_MODEL": self.node("CrucibleModel", ckpt_name=self.var("tiny_sd15", "(none)")),
            "CRUCIBLE_DATASET": self.dataset(),
            "CRUCIBLE_CAPTIONS": self.node("CrucibleCaptionOptions"),
            "CRUCIBLE_NETWORK": self.node("CrucibleNetworkOptions", network_dim=4, network_alpha=4.0),
            "CRUCIBLE_OPTIM": self.node("CrucibleOptimizerOptions"),
            "CRUCIBLE_TRAINING": self.node("CrucibleTrainingOptions"),
        }

    def train_prompt(self, run_name: str, model: dict | None = None, **train) -> dict:
        return {
            "1": model or self.node("CrucibleModel", ckpt_name=self.var("tiny_sd15", "(none)")),
            "2": self.dataset(repeats=1),
            "3": self.node("CrucibleNetworkOptions", network_dim=4, network_alpha=4.0),
            "4": self.node("CrucibleTrain", model=["1", 0], dataset=["2", 0], network=["3", 0], run_name=run_name,
                           max_train_steps=1, batch_size=1, save_precision="fp32", **train),
        }

    def sweep_prompt(self, **sweep) -> dict:
        """Checkpoint Sweep (not an output node) feeding Image Grid's labels, so it runs; MODEL/CLIP are literals
        (the sweep must refuse its run before it touches them)."""
        return {
            "1": self.node("CrucibleCheckpointSweep", model="MODEL", clip="CLIP", **sweep),
            "2": self.node("EmptyImage", width=8, height=8, batch_size=1),
            "3": self.node("CrucibleImageGrid", images=["2", 0], labels=["1", 4], save=False),
        }

    # --- checks --------------------------------------------------------------------------------------------------
    async def refused(self, name: str, prompt: dict, needles: list[str], comfy_may_refuse: bool = False) -> None:
        """Post ``prompt``: it must be refused with ``needles`` in the error, leak nothing, and leave the queue alive."""
        if self.stuck:
            self.ctx.results.fail(f"hostile: {name}", "not run: the queue is stuck since an earlier case")
            return
        offset = log_size(self.ctx.server_log)
        run = await run_prompt(self.ctx.server, prompt, TIMEOUT)
        text = run.error_text()
        problems, detail = [], ""
        if run.timed_out:
            problems.append(f"no answer within {TIMEOUT:.0f}s (the prompt hangs)")
        elif run.succeeded:
            problems.append("the prompt ran to success; expected a refusal")
        elif run.rejected and comfy_may_refuse and mentions_all(text, needles):
            detail = f"refused by ComfyUI's own validation (HTTP {run.status}): {_validation_message(run)}"
            self.refused_by_comfy.append(name)
        else:
            missing = mentions_all(text, needles)
            if missing:
                problems.append(f"the error does not mention {missing}:\n{text[-3000:]}")
            detail = _first_message(run) or _validation_message(run) or text[:160]
        problems += self.leaks(run, offset)
        problems += await self.alive()
        self.ctx.results.check(f"hostile: {name}", problems, detail[:220])

    async def passes(self, name: str, prompt: dict, check, or_refused: list[str] | None = None) -> Run | None:
        """Post ``prompt``: it must succeed (a sanitised name, for example) and ``check(run)`` list no problems;
        with ``or_refused``, a refusal whose error mentions those strings is fine too."""
        if self.stuck:
            self.ctx.results.fail(f"hostile: {name}", "not run: the queue is stuck since an earlier case")
            return None
        offset = log_size(self.ctx.server_log)
        run = await run_prompt(self.ctx.server, prompt, TIMEOUT)
        detail = f"ran in {run.seconds:.1f}s"
        if run.succeeded:
            problems = check(run)
        elif or_refused is not None and not run.timed_out and not mentions_all(run.error_text(), or_refused):
            problems, detail = [], "refused: " + (_first_message(run) or run.error_text()[:160])
        else:
            problems = [f"the prompt did not succeed:\n{run.error_text()[-3000:]}"]
        problems += self.leaks(run, offset) + await self.alive()
        self.ctx.results.check(f"hostile: {name}", problems, detail[:220])
        return run

    def leaks(self, run: Run, offset: int) -> list[str]:
        seen = json.dumps([run.body, run.history], default=str) + log_since(self.ctx.server_log, offset)
        problems = ["the secret marker from a file outside the allowed folders appears in the response, history "
                    "or server log"] if SECRET in seen else []
        problems += [f"a crafted pickle ran: {p} exists" for p in self.pwned if p.exists()]
        return problems

    async def alive(self) -> list[str]:
        """A normal prompt runs to success (a new background colour, so ComfyUI's cache cannot skip it)."""
        self.alive_count += 1
        colour = f"#{self.alive_count % 0xFFFFFF:06x}"
        run = await run_prompt(self.ctx.server, {"1": self.dataset(background_color=colour)}, ALIVE_TIMEOUT)
        if run.succeeded:
            return []
        self.stuck = run.timed_out
        return [f"a normal prompt afterwards did not succeed ({'timed out: the queue is stuck' if run.timed_out else run.error_text()[-1500:]})"]

    def final(self, before: set[Path]) -> None:
        problems = []
        new = sorted(self.snapshot() - before)
        problems += [f"new file outside ComfyUI's folders: {p}" for p in new[:20]]
        for folder in (self.root / "output", self.root / "models", self.root / "user"):
            for path in folder.rglob("*") if folder.is_dir() else []:
                if path.is_file() and not path.is_symlink() and path.stat().st_size < 20_000_000:
                    if SECRET.encode() in path.read_bytes():
                        problems.append(f"{path} contains the secret marker")
        for folder in (Path("/tmp"), self.root.parent, self.root, Path("/")):
            problems += [f"{p} was written" for p in folder.glob("*hostile-escape*")]
        problems += [f"a crafted pickle ran: {p} exists" for p in self.pwned if p.exists()]
        self.ctx.results.check("hostile: nothing written or leaked outside the allowed folders", problems,
                               f"{len(before)} files outside ComfyUI's folders unchanged; {self.alive_count} normal "
                               "prompts ran between the cases")


def _first_message(run: Run) -> str:
    for event, data in (run.history or {}).get("status", {}).get("messages", []):
        if event == "execution_error":
            return f"{data.get('node_type')}: {data.get('exception_message', '')}".strip()
    return ""


def _validation_message(run: Run) -> str:
    """The first node error of a prompt ComfyUI refused (400), as one line."""
    for node_id, entry in run.node_errors.items():
        for error in entry.get("errors", []):
            return f"node {node_id}: {error.get('message', '')}: {error.get('details', '')}"
    return (run.body.get("error") or {}).get("message", "") if isinstance(run.body, dict) else ""


def _safetensors_with(marker: str) -> bytes:
    """A valid safetensors file (one tiny tensor) whose metadata holds ``marker``."""
    header = json.dumps({"__metadata__": {"note": marker}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
    header += " " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header.encode() + b"\x00\x00\x00\x00"


# --- the cases -----------------------------------------------------------------------------------------------------
async def run_checks(ctx: StageContext) -> None:
    h = Hostile(ctx)
    if "CrucibleDataset" not in ctx.object_info:
        ctx.results.skip("hostile", "the pack's nodes are not listed")
        return
    if ctx.resources.get("demo_data", {}).get("status") != "ok":
        ctx.results.skip("hostile", "no demo dataset in input/ (resource demo_data)")
        return
    h.plant()
    before = h.snapshot()
    try:
        await caption_extension(h)
        await traversal(h)
        await symlinks(h)
        await unencodable(h)
        await forged_sockets(h)
        await forged_run(h)
        await pickles(h)
        await names_and_prefixes(h)
        await bad_numbers(h)
    finally:
        h.final(before)
        if h.refused_by_comfy:
            print(f"note: {len(h.refused_by_comfy)} case(s) were refused by ComfyUI {ctx.comfy_version} itself: "
                  + ", ".join(h.refused_by_comfy), flush=True)
        shutil.rmtree(h.tmp, ignore_errors=True)


async def caption_extension(h: Hostile) -> None:
    """Issue 13 case 1: the caption extension climbs out of the dataset folder to a file outside."""
    folder = h.root / "input" / "hostile_cap"
    for target in (h.outside / "secret", h.tmp / "secret", Path("/etc/passwd")):
        rel = os.path.relpath(target.with_suffix(""), folder / "a.d")
        ext = f".d/{rel}" + (".txt" if target.name == "secret" else "")
        await h.refused(f"caption_extension climbing to {target}", {"1": h.node(
            "CrucibleDataset", path="hostile_cap", resolution=64, caption_extension=ext)}, ["caption_extension"])
    await h.refused("caption_extension absolute path", {"1": h.dataset(caption_extension="/etc/passwd")},
                    ["caption_extension", "not a file extension"])


async def traversal(h: Hostile) -> None:
    """``..``, absolute paths and ``~`` in every path-like field."""
    demo = h.var("demo_data", "crucible_demo")
    for path in ["../../hostile-private/dataset", str(h.outside / "dataset"), str(h.tmp / "dataset"), "~", "/",
                 f"{demo}/../../models", f"{demo}/../../../hostile-private/dataset", "/etc", "../input_sibling"]:
        await h.refused(f"Crucible Dataset path {path!r}", {"1": h.dataset(path=path)}, ["dataset"])
    model_paths = [str(h.outside / "secret.safetensors"), str(h.tmp / "secret.safetensors"), "/etc/passwd",
                   "../hostile-private/secret.safetensors",
                   str(h.root / "models" / "checkpoints" / ".." / ".." / ".." / "hostile-private" / "secret.safetensors")]
    for path in model_paths:
        await h.refused(f"Crucible Model path {path!r}", h.train_prompt("hostile-model", h.node(
            "CrucibleModel", path=path)), ["model path", "outside the allowed folders"])
    for path in model_paths[:2]:
        await h.refused(f"Crucible Split Model path {path!r}", h.train_prompt("hostile-split", h.node(
            "CrucibleSplitModel", path=path)), ["model path", "outside the allowed folders"])


async def symlinks(h: Hostile) -> None:
    """Links placed in input/ that point outside: the folder, a concept folder, a caption file."""
    for name, what in [("hostile_link", "outside the allowed folders"), ("hostile_mixed", "5_stolen"),
                       ("hostile_capfile", "outside the allowed folders")]:
        await h.refused(f"symlink out of input/ ({name})", {"1": h.dataset(path=name)}, [what])


async def unencodable(h: Hostile) -> None:
    """Issue 13 case 4 (the queue stopped) plus NUL bytes and huge names, in every kind of string input."""
    await h.refused("dataset path 'ds_\\udcff' (lone surrogate)", {"1": h.dataset(path="ds_\udcff")},
                    ["cannot be encoded"])
    await h.refused("dataset path with a NUL byte", {"1": h.dataset(path="crucible_demo\x00/x")}, ["NUL"])
    await h.refused("dataset name of 5,000 characters", {"1": h.dataset(path="d" * 5000)},
                    ["too long", "5000 characters"])
    await h.refused("dataset name with a 300-byte component", {"1": h.dataset(path="a/" + "b" * 300)},
                    ["longer than 255 bytes"])
    await h.refused("model path with a lone surrogate", h.train_prompt("hostile-u", h.node(
        "CrucibleModel", path="/x\udcff")), ["cannot be encoded"])
    await h.refused("run name with a lone surrogate", h.train_prompt("run_\udcff"), ["run_name", "cannot be encoded"])
    await h.refused("caption options with a lone surrogate", {"1": h.node("CrucibleCaptionOptions",
                    trigger_word="sks\udcff"), "2": h.dataset(captions=["1", 0])}, ["trigger_word", "cannot be encoded"])
    await h.refused("caption_extension with a lone surrogate", {"1": h.dataset(caption_extension=".t\udcff")},
                    ["caption_extension", "cannot be encoded"])


async def forged_sockets(h: Hostile) -> None:
    """Issue 13 case 2: a literal JSON value where a node's output belongs, for every custom-typed input."""
    producers = h.producers()
    forgeries = [("a dict", lambda p: {"family": "sd15", "path": p}),
                 ("a __value__ list", lambda p: {"__value__": [{"path": p, "resolution": 64}]})]
    secret = str(h.outside / "secret.safetensors")
    for class_type, info in sorted(h.ctx.object_info.items()):
        if not class_type.startswith("Crucible"):
            continue
        spec = info.get("input", {})
        inputs = [(n, e[0]) for g in ("required", "optional") for n, e in spec.get(g, {}).items()
                  if isinstance(e[0], str) and e[0].startswith("CRUCIBLE_")]
        for name, socket in inputs:
            for label, forge in forgeries:
                prompt, links = {}, {}
                for other, other_socket in inputs:
                    if other != name and other_socket in producers:
                        node_id = str(len(prompt) + 10)
                        prompt[node_id] = producers[other_socket]
                        links[other] = [node_id, 0]
                if class_type == "CrucibleCheckpointSweep":
                    prompt.update(h.sweep_prompt(run=forge(secret)))
                else:
                    prompt["1"] = h.node(class_type, **{**links, name: forge(secret)})
                    if class_type == "CrucibleTrain":
                        prompt["1"]["inputs"].update(max_train_steps=1, run_name="hostile-forged")
                maker = "Crucible Train" if socket == "CRUCIBLE_RUN" else ""
                await h.refused(f"forged {socket} ({label}) as {class_type}.{name}", prompt,
                                [f"input '{name}' is not a {maker}", "connect a"], comfy_may_refuse=True)


async def forged_run(h: Hostile) -> None:
    """Issue 13 case 3: a forged run makes the sweep open an outside LoRA and /etc/passwd (then IndexError)."""
    run = {"kind": "lora", "checkpoints": [{"path": str(h.outside / "secret.safetensors")}, {"path": "/etc/passwd"}]}
    await h.refused("forged run for Crucible Checkpoint Sweep", h.sweep_prompt(run=run),
                    ["input 'run' is not a Crucible Train output"], comfy_may_refuse=True)
    await h.refused("forged empty run (was IndexError)", h.sweep_prompt(run={"kind": "lora", "checkpoints": []}),
                    ["input 'run' is not a Crucible Train output"], comfy_may_refuse=True)


async def pickles(h: Hostile) -> None:
    """Pickles as a model (also renamed .safetensors) and as a run's training state: refused, never unpickled."""
    ckpts = h.root / "models" / "checkpoints"
    await h.refused("pickle .ckpt as the model", h.train_prompt("hostile-pickle", h.node(
        "CrucibleModel", path=str(ckpts / "hostile_pickle.ckpt"))), ["pickle"])
    await h.refused("pickle renamed .safetensors as the model", h.train_prompt("hostile-pickle", h.node(
        "CrucibleModel", path=str(ckpts / "hostile_pickle_renamed.safetensors"))), ["not a readable safetensors"])
    if h.ctx.resources.get("tiny_sd15", {}).get("status") != "ok":
        h.ctx.results.skip("hostile: pickle as training state", "no tiny_sd15 resource to train a run")
        return
    run = await h.passes("a short run to plant a state into", h.train_prompt("hostile-state"), lambda r: [])
    state = h.root / "output" / "crucible" / "hostile-state" / "state" / "state.pt"
    if run is None or not state.is_file():
        h.ctx.results.skip("hostile: pickle as training state", f"the run saved no {state}")
        return
    state.write_bytes(pickle.dumps({"step": 1, "epoch": 1, "format": 1, "network": Pwn(h.pwned[0])}))
    await h.refused("pickle as training state (resume)", h.train_prompt("hostile-state", resume=True,
                                                                        resume_force=True), ["refused"])


async def names_and_prefixes(h: Hostile) -> None:
    """Run names and grid prefixes that try to leave their folder become one harmless name inside it."""
    root = h.root.resolve()

    def inside(folder: Path, pattern: str):
        def check(run: Run) -> list[str]:
            made = [p for p in folder.rglob(pattern)]
            problems = [] if made else [f"nothing named {pattern} was written under {folder}"]
            return problems + [f"{p} is outside {folder}" for p in made if folder.resolve() not in p.resolve().parents]
        return check

    for prefix in ["../../../hostile-escape", "/tmp/hostile-escape", "..\\..\\hostile-escape", "CON"]:
        prompt = {"1": h.node("EmptyImage", width=8, height=8, batch_size=1),
                  "2": h.node("CrucibleImageGrid", images=["1", 0], save=True, filename_prefix=prefix)}
        await h.passes(f"grid filename_prefix {prefix!r} stays in output/ (or is refused)", prompt,
                       inside(root / "output", "*hostile-escape*" if "hostile" in prefix else "*CON*"),
                       or_refused=["filename_prefix"])
    if h.ctx.resources.get("tiny_sd15", {}).get("status") != "ok":
        h.ctx.results.skip("hostile: run names", "no tiny_sd15 resource to train with")
        return
    for name in ["../../../hostile-escape", "/tmp/hostile-escape"]:
        await h.passes(f"run_name {name!r} stays in models/loras and output/crucible", h.train_prompt(name),
                       inside(root / "models" / "loras", "*hostile-escape*"))


async def bad_numbers(h: Hostile) -> None:
    """Out-of-range, non-finite and non-numeric values."""
    await h.refused("NaN learning_rate", {**_train_with(h, optimizer=["5", 0]), "5": h.node(
        "CrucibleOptimizerOptions", learning_rate=float("nan"))}, ["learning_rate"], comfy_may_refuse=True)
    await h.refused("resolution above max", {"1": h.dataset(resolution=10**9)}, ["resolution"], comfy_may_refuse=True)
    await h.refused("resolution not a number", {"1": h.dataset(resolution="abc")}, ["resolution"],
                    comfy_may_refuse=True)
    await h.refused("repeats negative", {"1": h.dataset(repeats=-5)}, ["repeats"], comfy_may_refuse=True)
    for strengths in ["nan", "inf", "1e400"]:
        await h.refused(f"sweep strengths {strengths!r}", _sweep_folder(h, strengths=strengths), ["strengths"])
    for seeds in ["-1", str(2**64), "9" * 5000]:
        await h.refused(f"sweep seeds {seeds[:20]!r}", _sweep_folder(h, seeds=seeds), ["seeds"])
    await h.refused("caption preview images 'x-y'", {"1": h.dataset(), "2": h.node(
        "CrucibleCaptionPreview", dataset=["1", 0], images="x-y")}, ["images"])
    await h.passes("caption preview images '0-999999999999' is cheap", {"1": h.dataset(), "2": h.node(
        "CrucibleCaptionPreview", dataset=["1", 0], images="0-999999999999", epochs=1)}, lambda r: [])


def _train_with(h: Hostile, **links) -> dict:
    prompt = h.train_prompt("hostile-numbers")
    prompt["4"]["inputs"].update(links)
    return prompt


def _sweep_folder(h: Hostile, **inputs) -> dict:
    """A sweep over a real (tiny, valid) LoRA folder, so only the bad number can fail it."""
    folder = h.root / "models" / "loras" / "hostile_sweep"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hostile_sweep.safetensors").write_bytes(_safetensors_with("not a secret"))
    return h.sweep_prompt(folder="loras/hostile_sweep", **inputs)
