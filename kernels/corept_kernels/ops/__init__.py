"""The kernels as torch custom operators (``torch.library``): the forms ``torch.compile`` traces.

Importing this package registers every operator (namespace ``corept_kernels``); the package
``corept_kernels`` imports it. :func:`corept_kernels.capabilities.dispatch` answers a kernel's
``compiled_fn`` (which calls these operators) while Dynamo traces, and its eager
``autograd.Function`` otherwise; both run the same launch functions.
"""
from corept_kernels.ops import norms  # noqa: F401  (registers the operators)
from corept_kernels.ops import rope  # noqa: F401
from corept_kernels.ops import lora  # noqa: F401
from corept_kernels.ops import glu  # noqa: F401
from corept_kernels.ops import cross_entropy  # noqa: F401
from corept_kernels.ops import lora_pieces  # noqa: F401
from corept_kernels.ops import fused_linear_ce  # noqa: F401
from corept_kernels.ops import attention  # noqa: F401
from corept_kernels.ops import experts  # noqa: F401
