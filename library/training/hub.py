"""Hugging Face Hub: upload saved models / training states, resume from a state stored on the Hub.

Options and behaviour follow kohya-ss/sd-scripts (reference/cli.md §9, docs/hub.md):

* ``--huggingface_repo_id`` uploads every saved model to ``<path_in_repo>/<file name>`` of that repo
  (created on first use, private unless ``--huggingface_repo_visibility public``);
  ``--save_state_to_huggingface`` uploads the ``*-state`` folders too.
* ``--async_upload`` uploads in one background thread (in save order); the run waits for the queue
  at its end. An upload failure is a warning: it never stops the training run or touches local files.
* ``--resume_from_huggingface --resume {repo_id}/{path_in_repo}:{revision}:{repo_type}`` downloads
  that state folder (into the Hugging Face cache) and resumes from the local copy.

Only the main process uploads (the trainer creates the uploader there); every process downloads a
resumed state (the Hub cache is safe for concurrent downloads of the same files).
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import shutil
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger(__name__)

REPO_TYPES = ("model", "dataset", "space")
KINDS = ("model", "state")
STAGING_DIR = ".hub-upload-queue"  # hard links of queued async uploads, inside the output folder


def add_hub_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Hugging Face Hub")
    group.add_argument(
        "--huggingface_repo_id", type=str, default=None,
        help="upload every saved model to this Hub repo (owner/name); created if missing",
    )
    group.add_argument(
        "--huggingface_repo_type", type=str, default=None, help="repo type: model (default), dataset or space"
    )
    group.add_argument(
        "--huggingface_path_in_repo", type=str, default=None, help="folder inside the repo to upload into (default: root)"
    )
    group.add_argument(
        "--huggingface_token", type=str, default=None,
        help="Hub access token (default: the saved login or HF_TOKEN); better kept in --config_file than on the command line",
    )
    group.add_argument(
        "--huggingface_repo_visibility", type=str, default=None,
        help="visibility of a repo this run creates: public, or private (default; any other value is private)",
    )
    group.add_argument(
        "--save_state_to_huggingface", action="store_true",
        help="also upload the training state folders (with --save_state / --save_state_on_train_end)",
    )
    group.add_argument(
        "--resume_from_huggingface", action="store_true",
        help="download the state to resume from the Hub: --resume {repo_id}/{path_in_repo}:{revision}:{repo_type}",
    )
    group.add_argument(
        "--async_upload", action="store_true", help="upload in the background while training goes on"
    )


# ---------------------------------------------------------------- checks


@dataclass(frozen=True)
class ResumeSpec:
    """`--resume` of `--resume_from_huggingface`: where a state folder lives on the Hub."""

    repo_id: str
    path_in_repo: str  # "" = the repo root
    revision: str | None  # None = the default branch
    repo_type: str  # model, dataset or space


def parse_resume_spec(spec: str) -> ResumeSpec:
    """``owner/name/path/in/repo[:revision[:repo_type]]`` (upstream's form; revision and type optional)."""
    if not spec or not spec.strip():
        raise ValueError("empty; expected {repo_id}/{path_in_repo}:{revision}:{repo_type}")
    parts = spec.strip().split(":")
    if len(parts) > 3:
        raise ValueError("too many ':' (expected {repo_id}/{path_in_repo}:{revision}:{repo_type})")
    location, revision, repo_type = (parts + [None, None])[:3]
    pieces = location.split("/")
    if len(pieces) < 2 or not pieces[0] or not pieces[1]:
        raise ValueError("expected {repo_id}/{path_in_repo}:{revision}:{repo_type} with repo_id = owner/name")
    repo_type = repo_type or "model"
    if repo_type not in REPO_TYPES:
        raise ValueError(f"repo type {repo_type!r} is not one of {', '.join(REPO_TYPES)}")
    path_in_repo = "/".join(p for p in pieces[2:] if p)
    return ResumeSpec(f"{pieces[0]}/{pieces[1]}", path_in_repo, revision or None, repo_type)


def hub_option_problems(args: argparse.Namespace, argv: list[str] | None = None) -> list[str]:
    """Bad Hub option combinations (errors); risky ones are logged as warnings.

    `argv` is the process command line (default `sys.argv[1:]`): W&B records it, so a token typed
    there is published with the run (upstream warns the same way).
    """
    problems = []
    repo_id = args.huggingface_repo_id
    if repo_id:  # "" (as some GUIs write) counts as not given
        if repo_id.count("/") > 1 or any(not p.strip() for p in repo_id.split("/")):
            problems.append(f"--huggingface_repo_id {repo_id!r}: expected owner/name (or name)")
    else:
        needs_repo = [
            f"--{name}" for name in (
                "huggingface_repo_type", "huggingface_path_in_repo", "huggingface_repo_visibility",
                "save_state_to_huggingface", "async_upload",
            )
            if getattr(args, name)
        ]
        if needs_repo:
            problems.append(f"{', '.join(needs_repo)}: upload option(s) without --huggingface_repo_id (the repo to upload to)")
    if args.huggingface_repo_type is not None and args.huggingface_repo_type not in REPO_TYPES:
        problems.append(f"--huggingface_repo_type {args.huggingface_repo_type!r}: choose one of {', '.join(REPO_TYPES)}")
    if args.resume_from_huggingface:
        if not args.resume:
            problems.append(
                "--resume_from_huggingface needs --resume {repo_id}/{path_in_repo}:{revision}:{repo_type} "
                "(e.g. you/your-model/test-000002-state:main:model)"
            )
        else:
            try:
                parse_resume_spec(args.resume)
            except ValueError as err:
                problems.append(f"--resume {args.resume} (with --resume_from_huggingface): {err}")
    if args.save_state_to_huggingface and repo_id and not (
        getattr(args, "save_state", False) or getattr(args, "save_state_on_train_end", False)
    ):
        logger.warning(
            "--save_state_to_huggingface: states are only written with --save_state or --save_state_on_train_end "
            "(and when a run is interrupted); only those are uploaded"
        )
    _warn_token_on_command_line(args, sys.argv[1:] if argv is None else argv)
    return problems


def _warn_token_on_command_line(args: argparse.Namespace, argv: list[str]) -> None:
    from library.training.tracking import tracker_kinds

    if "wandb" not in tracker_kinds(args):
        return
    if any(a == "--huggingface_token" or a.startswith("--huggingface_token=") for a in argv):
        logger.warning(
            "wandb is enabled, but option `huggingface_token` is included in the command line. Because the command "
            "line is exposed to the public, it is recommended to move it to the `.toml` file (--config_file)."
        )


# ---------------------------------------------------------------- uploads


class HubUploader:
    """Uploads saved files / folders to one Hub repo; failures become warnings (see `failed`)."""

    def __init__(
        self,
        repo_id: str,
        *,
        repo_type: str | None = None,
        path_in_repo: str | None = None,
        private: bool = True,
        async_upload: bool = False,
        token: str | None = None,
        api: Any = None,
    ) -> None:
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi(token=token)
        self.api = api
        self.repo_id = repo_id
        self.repo_type = repo_type or "model"
        self.path_in_repo = (path_in_repo or "").strip("/")
        self.private = private
        self.async_upload = async_upload
        self.uploaded: list[str] = []  # "path/in/repo" of finished uploads
        self.failed: list[tuple[str, str]] = []  # (local path, error) of failed ones
        self._repo_ready = False
        self._lock = threading.Lock()
        self._queue: queue.Queue | None = None
        self._worker: threading.Thread | None = None
        self._staging_roots: set[Path] = set()
        self._closed = False

    @classmethod
    def from_args(cls, args: argparse.Namespace, api: Any = None) -> HubUploader | None:
        """None without --huggingface_repo_id."""
        if not args.huggingface_repo_id:
            return None
        return cls(
            args.huggingface_repo_id,
            repo_type=args.huggingface_repo_type,
            path_in_repo=args.huggingface_path_in_repo,
            private=args.huggingface_repo_visibility != "public",
            async_upload=bool(args.async_upload),
            token=args.huggingface_token,
            api=api,
        )

    def target(self, local_path: str | os.PathLike) -> str:
        """Where `local_path` goes in the repo: `<path_in_repo>/<name>`."""
        name = Path(local_path).name
        return f"{self.path_in_repo}/{name}" if self.path_in_repo else name

    def upload(self, local_path: str | os.PathLike, kind: str) -> None:
        """Upload a saved model (`kind="model"`) or state folder (`kind="state"`); never raises."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        if self._closed:
            raise RuntimeError("HubUploader.upload() after close()")
        local_path = Path(local_path)
        if not self.async_upload:
            self._upload_now(local_path, local_path, kind)
            return
        # The run goes on while the upload waits: pin today's content (hard links) so keep-last-N
        # pruning or a later save under the same name cannot change or delete what is uploaded.
        source = self._pin(local_path)
        if self._worker is None:
            self._queue = queue.Queue()
            self._worker = threading.Thread(target=self._work, name="hub-upload", daemon=True)
            self._worker.start()
        logger.info("hub: queued %s %s for upload to %s", kind, local_path.name, self._url(self.target(local_path)))
        self._queue.put((source, local_path, kind))

    def close(self) -> list[tuple[str, str]]:
        """Wait for queued uploads, log a summary, return the failures. Safe to call twice."""
        if self._closed:
            return list(self.failed)
        self._closed = True
        if self._worker is not None:
            pending = self._queue.qsize()
            if pending:
                logger.info("hub: waiting for %d queued upload(s) to finish", pending)
            self._queue.put(None)
            try:
                self._worker.join()
            except KeyboardInterrupt:
                logger.warning("hub: interrupted while uploading; queued uploads were abandoned (local files are kept)")
                raise
        for root in self._staging_roots:
            shutil.rmtree(root, ignore_errors=True)
        if self.uploaded or self.failed:
            logger.info("hub: %d upload(s) to %s finished, %d failed", len(self.uploaded), self.repo_id, len(self.failed))
        for path, error in self.failed:
            logger.warning("hub: %s was not uploaded (%s); it is still on disk, upload it by hand", path, error)
        return list(self.failed)

    # ---------------------------------------------------------------- internals

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            source, original, kind = item
            try:
                self._upload_now(source, original, kind)
            finally:
                if source != original:
                    _remove(source.parent)

    def _upload_now(self, source: Path, original: Path, kind: str) -> None:
        target = self.target(original)
        try:
            self._ensure_repo()
            if source.is_dir():
                self.api.upload_folder(
                    repo_id=self.repo_id, repo_type=self.repo_type, folder_path=str(source), path_in_repo=target,
                    commit_message=f"Upload {kind} {original.name}",
                )
            else:
                self.api.upload_file(
                    repo_id=self.repo_id, repo_type=self.repo_type, path_or_fileobj=str(source), path_in_repo=target,
                    commit_message=f"Upload {kind} {original.name}",
                )
        except Exception as err:  # noqa: BLE001 - an upload never stops training
            message = f"{type(err).__name__}: {err}"
            with self._lock:
                self.failed.append((str(original), message))
            logger.warning("hub: uploading %s %s to %s failed: %s", kind, original, self._url(target), message)
            return
        with self._lock:
            self.uploaded.append(target)
        logger.info("hub: uploaded %s %s to %s", kind, original.name, self._url(target))

    def _ensure_repo(self) -> None:
        if self._repo_ready:
            return
        try:
            self.api.create_repo(repo_id=self.repo_id, repo_type=self.repo_type, private=self.private, exist_ok=True)
            self._repo_ready = True
        except Exception as err:  # noqa: BLE001 - the repo may exist (e.g. no create right in an org); try uploading
            logger.warning("hub: could not create repo %s (%s: %s); trying to upload anyway", self.repo_id, type(err).__name__, err)

    def _pin(self, path: Path) -> Path:
        """A hard-linked copy of `path` under <its folder>/.hub-upload-queue/, or `path` where links fail."""
        root = path.parent / STAGING_DIR
        slot = root / uuid.uuid4().hex[:12]
        try:
            slot.mkdir(parents=True)
            self._staging_roots.add(root)
            pinned = slot / path.name
            if path.is_dir():
                shutil.copytree(path, pinned, copy_function=os.link)
            else:
                os.link(path, pinned)
            return pinned
        except OSError as err:
            _remove(slot)
            logger.debug("hub: cannot hard-link %s (%s); uploading it in place", path, err)
            return path

    def _url(self, target: str) -> str:
        prefix = "" if self.repo_type == "model" else f"{self.repo_type}s/"
        return f"hf://{prefix}{self.repo_id}/{target}"


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------- resume


def download_state(
    resume_spec: str,
    local_dir: str | os.PathLike | None = None,
    *,
    token: str | None = None,
    snapshot_download: Callable[..., str] | None = None,
) -> Path:
    """Download the state folder named by `--resume` (`{repo_id}/{path}:{revision}:{repo_type}`).

    Files go to the Hugging Face cache (or `local_dir`); returns the local state folder. Raises
    ResumeError when the download fails or the folder is not a training state.
    """
    from library.training.checkpoints import STATE_FILE, ResumeError

    try:
        spec = parse_resume_spec(resume_spec)
    except ValueError as err:
        raise ResumeError(f"--resume {resume_spec} (with --resume_from_huggingface): {err}") from err
    if snapshot_download is None:
        from huggingface_hub import snapshot_download
    where = f"{spec.repo_id}/{spec.path_in_repo} (revision {spec.revision or 'default'}, {spec.repo_type} repo)"
    logger.info("downloading the training state %s", where)
    try:
        root = snapshot_download(
            repo_id=spec.repo_id,
            repo_type=spec.repo_type,
            revision=spec.revision,
            allow_patterns=[f"{spec.path_in_repo}/*"] if spec.path_in_repo else None,
            local_dir=str(local_dir) if local_dir is not None else None,
            token=token,
        )
    except Exception as err:  # noqa: BLE001 - network, auth, missing repo/revision: one clear line
        raise ResumeError(f"--resume_from_huggingface: cannot download {where}: {type(err).__name__}: {err}") from err
    folder = Path(root) / spec.path_in_repo if spec.path_in_repo else Path(root)
    if not (folder / STATE_FILE).is_file():
        raise ResumeError(
            f"--resume_from_huggingface: {where} holds no {STATE_FILE}; give the path of a '*-state' folder "
            "uploaded with --save_state_to_huggingface"
        )
    logger.info("resuming from the downloaded state %s", folder)
    return folder
