"""Saving: ``corept.save`` (:mod:`.save`), merged weights (:mod:`.merge`), and writing corept's file
set into a folder atomically and recoverably (:mod:`.fileset`)."""
from corept.saving.fileset import atomic_folder, file_set, recover, remove, saved_files
from corept.saving.merge import compute_dtype, merged_state_dict, write_weights
from corept.saving.save import METHODS, save

__all__ = ["METHODS", "atomic_folder", "compute_dtype", "file_set", "merged_state_dict", "recover", "remove", "save",
           "saved_files", "write_weights"]
