"""Models and Medusa heads named by a Hugging Face hub id: `org/name`, or `org/name@revision` for a branch,
tag or commit (`@` because a spec is one string, on the command line and in the environment alike).

A spec is a hub id only when no file or folder of that name exists: a local path always wins. An id
resolves to a snapshot folder in huggingface_hub's cache (HF_HUB_CACHE, else HF_HOME/hub, else
~/.cache/huggingface/hub), downloading there only the files a loader names; the loaders then read that
folder as any other. huggingface_hub finds the token itself (HF_TOKEN, or the file `hf auth login`
wrote). With HF_HUB_OFFLINE=1 only the cache is looked at; online, an unreachable hub also falls back to
the cache. An id found in neither raises HubError naming it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

_HUB_ID = re.compile(r"(?P<repo_id>[^/@]+/[^/@]+)(?:@(?P<revision>.+))?")
_LOGIN = "set HF_TOKEN (or run `hf auth login`)"


class HubError(Exception):
    """A hub id that cannot be resolved: not cached and not reachable, unknown, gated or refused."""


@dataclass(frozen=True)
class HubId:
    repo_id: str  # "org/name"
    revision: str | None  # branch, tag or commit hash; None: the repository's default branch

    def __str__(self) -> str:
        return self.repo_id if self.revision is None else f"{self.repo_id}@{self.revision}"


def hub_id(spec: str | Path) -> HubId | None:
    """The hub id `spec` names, or None when it is a path that exists or does not read `org/name[@rev]`."""
    text = str(spec)
    match = _HUB_ID.fullmatch(text)
    if match is None or Path(text).expanduser().exists():
        return None
    try:
        validate_repo_id(match["repo_id"])
    except HFValidationError:
        return None
    return HubId(match["repo_id"], match["revision"])


def snapshot(repo: HubId, allow_patterns: list[str], what: str) -> Path:
    """The cached snapshot folder of `repo` holding the files that match `allow_patterns` (fnmatch), as
    far as the repository has them; downloaded first unless offline. `what` names the kind of repository
    in messages ("model", "Medusa heads")."""
    offline = constants.HF_HUB_OFFLINE
    try:
        # local_files_only when offline: huggingface_hub's own offline switch is set on its HTTP session
        # once per thread, so a session made before the variable was read would still go out
        folder = snapshot_download(repo.repo_id, revision=repo.revision, allow_patterns=allow_patterns,
                                   local_files_only=offline)
    except GatedRepoError as err:
        raise HubError(f"the {what} {str(repo)!r} is gated: accept its terms on "
                       f"https://huggingface.co/{repo.repo_id}, then {_LOGIN}") from err
    except RepositoryNotFoundError as err:
        raise HubError(f"{repo.repo_id!r} is not a local path, and the hub has no {what} of that id that "
                       f"this token may read: check the id; for a private one, {_LOGIN}") from err
    except RevisionNotFoundError as err:
        raise HubError(f"the {what} {repo.repo_id!r} on the hub has no revision {repo.revision!r}") from err
    except LocalEntryNotFoundError as err:
        subject = (f"revision {repo.revision!r} of the {what} {repo.repo_id!r}" if repo.revision
                   else f"the {what} {repo.repo_id!r}")
        why = ("HF_HUB_OFFLINE is set, so the hub was not asked: unset it to download"
               if offline else "the hub could not be reached: check the network or the proxy")
        raise HubError(f"{str(repo)!r} is not a local path, and {subject} is not in the hub cache "
                       f"{constants.HF_HUB_CACHE}; {why}") from err
    except (OSError, HFValidationError) as err:  # the hub's other refusals, a network failure, a full disk
        raise HubError(f"cannot fetch the {what} {str(repo)!r} from the hub: {err}") from err
    return Path(folder)


def snapshot_commit(folder: Path) -> str | None:
    """The commit of a hub cache's snapshot folder (`.../snapshots/<commit>`, as `snapshot` returns),
    or None for any other folder."""
    is_commit = re.fullmatch(r"[0-9a-f]{40}", folder.name) is not None
    return folder.name if is_commit and folder.parent.name == "snapshots" else None
