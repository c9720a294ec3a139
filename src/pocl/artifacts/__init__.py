"""Artifacts pocl writes and reuses, in one place: how they are written (atomically), how they are
checked (sizes and checksums) and when they still apply (stamps).

* :mod:`.atomic`: one file written atomically (a temporary file, fsync, ``os.replace``);
* :mod:`.stamps`: :class:`Stamp`, the inputs an artifact was computed from, their hash and, when a
  stored hash differs, what changed in words;
* :mod:`.files`: :class:`StampedFile`, a data file plus ``NAME.meta.json`` (format, version, stamp,
  sha256): the ranking (``ranking.jsonl``) and the SeqKD answers;
* :mod:`.folders`: a folder plus ``manifest.json`` (sha256 of every file, the stamp), written by
  renaming a complete temporary folder into place: checkpoints, ``best/``, ``final/`` and the teacher
  cache.

The run matrix's evaluation cache stamps its results with :class:`Stamp` too. Which inputs go into
each stamp is the artifact's own business (:mod:`pocl.curriculum.ranking_stamps`,
:func:`pocl.training.teacher_cache.cache_stamp`, :mod:`pocl.baselines`); the hash is always
:func:`pocl.fingerprints.stamp_hash` of them.
"""

from .atomic import atomic_open, atomic_write, atomic_write_json, fsync_dir, write_file
from .files import StampedFile, meta_path
from .folders import (MANIFEST, atomic_folder_write, clean_temporaries, pocl_manifest,
                      replaceable_problem, unlisted_files, verify_folder, write_manifest)
from .stamps import Stamp, describe_changes

__all__ = ["MANIFEST", "Stamp", "StampedFile", "atomic_folder_write", "atomic_open", "atomic_write",
           "atomic_write_json", "clean_temporaries", "describe_changes", "fsync_dir", "meta_path",
           "pocl_manifest", "replaceable_problem", "unlisted_files", "verify_folder", "write_file", "write_manifest"]
