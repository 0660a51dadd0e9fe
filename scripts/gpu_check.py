"""Every toy MoE kind converted and checked on a CUDA device (the CPU tests' properties, on a GPU).

    PYTHONPATH=<site with transformers>:. python3 scripts/gpu_check.py

For each kind, three (experts, k) and two dtypes: calibration off bitwise the
original's (within rounding where the original itself is not deterministic on
the GPU: atomic adds), on within rounding, and every expert Linear seeing every
token once. Everything runs three times: with the default grouping of experts,
with every expert on its own (a container's ``group_work = 0``, as large experts run on a
GPU) and the lone experts combined several at a time (the default ``combine_elements``), and
with every expert on its own and combined on its own (``combine_elements[False] = 0``).
Prints the failures and a count; exit status 1 if any.
"""

import itertools
import torch, autocal
from autocal.synthesize import experts as experts_module
from autocal.testing.toy_moe import ToyMoEConfig, make_toy_block, example_hidden_states, KINDS, main_output
from autocal.testing.assertions import expert_linears, count_rows
from autocal.verify import compare_outputs
dev = torch.device("cuda")
bad = 0
groupings = ((experts_module.GROUP_WORK, experts_module.COMBINE_ELEMENTS[False]), (0, experts_module.COMBINE_ELEMENTS[False]),
             (0, 0))


def set_grouping(module, work, combine):
    """The device budgets of every experts container of ``module`` (``CalibrationExperts``)."""
    for container in module.modules():
        if isinstance(container, experts_module.CalibrationExperts):
            container.group_work, container.combine_elements[False] = work, combine


for (work, combine), dtype in itertools.product(groupings, (torch.float32, torch.bfloat16)):
    for kind in KINDS:
        for E, k in ((8, 2), (6, 6), (5, 1)):
            try:
                cfg = ToyMoEConfig(kind=kind, num_experts=E, top_k=k, dtype=dtype, n_group=1, topk_group=1)
            except ValueError:
                continue
            block = make_toy_block(cfg).to(dev)
            x = example_hidden_states(cfg, batch=2, seq=11).to(dev)
            try:
                with torch.no_grad():
                    ref, again = block(x), block(x)
                deterministic = torch.equal(main_output(ref), main_output(again))
                m = autocal.synthesize(block)
                set_grouping(m, work, combine)
                m.calibrate_all_experts = False
                with torch.no_grad():
                    off = m(x)
                m.calibrate_all_experts = True
                lin = expert_linears(m)
                with torch.no_grad(), count_rows(lin) as rows:
                    on = m(x)
                ok = (compare_outputs(ref, off)[1] or not deterministic and compare_outputs(ref, off)[2]) and compare_outputs(ref, on)[2] and set(rows.values()) == {22}
                if not ok:
                    bad += 1
                    print("BAD", kind, E, k, dtype, work, combine, compare_outputs(ref, off)[:2], compare_outputs(ref, on)[2], sorted(set(rows.values())))
            except Exception as e:
                bad += 1
                print("ERR", kind, E, k, dtype, work, combine, repr(e)[:300])
print("cuda checks done, bad =", bad, torch.cuda.get_device_name(0))
raise SystemExit(1 if bad else 0)
