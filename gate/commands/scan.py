"""``gate scan MODEL --data FILE|DIR --out DIR``: ``gate run`` without the report renderers.

Same policy (``--policy``, default the built-in default policy), same pipeline, same decision and exit codes; writes
report.json and triggers.npz only.
"""

from __future__ import annotations

from gate.commands.run import add_gate_args, execute
from gate.decision import exit_code_help


def register(sub) -> None:
    p = sub.add_parser("scan", help="scan a model for backdoors (B3D, or B3D-SS with --synthetic); no renderers",
                       description="Reverse-engineer a trigger for every class with queries only, flag classes whose "
                                   "trigger is an outlier and decide as `gate run` does, writing report.json and "
                                   f"triggers.npz. Exit {exit_code_help()}.")
    p.add_argument("--policy", help="policy YAML file (default: the built-in default policy, "
                                    "gate/policies/default.yaml)")
    add_gate_args(p, data_required=True)
    p.set_defaults(handler=lambda args: execute(args, renderers=False))
