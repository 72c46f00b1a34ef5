"""Instance patching: the answers hooks give (:mod:`.answers`), installing them with faithful
signatures (:mod:`.signature`, :mod:`.state`), the patch engine (:mod:`.patch`), the live report
(:mod:`.report`) and hub kernelization (:mod:`.hub_kernels`)."""
from corept.patching.answers import Keep, Replacement
from corept.patching.engine import architecture_of, is_patched, patch, record, state_of, unpatch
from corept.patching.report import PatchReport, report

__all__ = ["Keep", "Replacement", "PatchReport", "architecture_of", "is_patched", "patch", "record", "report",
           "state_of", "unpatch"]
