"""Every refusal and rare-case check of the runtime, each a named function with its reason.

The runtime (runtime.py) reads along the normal path and calls one of these in one line where a rare
case can occur. Each says what went wrong, names the layer or option, and gives the fix; none changes
the model. The test that pins each one is named in its docstring. Two rooms: `attach.py` (arguments and
targets, before anything is attached) and `calls.py` (every call of a hooked layer, and operations on an
attached adapter); callers use them as `guards.<name>`.
"""

from .attach import (  # noqa: F401
    NAME,
    _UnrunWatch,
    check_finite_init,
    check_flag,
    check_kind,
    check_known,
    check_name,
    check_no_clash,
    check_param_owner,
    check_rewritable,
    check_stacking,
    check_target,
    check_trainable,
    stop_cpu_repacking,
    warn_fp16,
    watch_unrun_hooks,
)
from .calls import (  # noqa: F401
    adapter_dtype,
    check_layer_targets_only,
    check_output,
    check_per_sample,
    describe,
    layer_input,
    refuse_copy_inside_blocks,
    require_original,
    require_outside_blocks,
    same_state_as_forward,
)
