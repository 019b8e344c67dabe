"""Platform probe and tuning plan.

    from xcstack.platform import probe, derive_plan, PlanOverrides, apply_affinity, plan_for_settings

    report = probe()                      # PlatformReport (cpu, cpus, memory, os, io_uring, limits, python)
    plan = derive_plan(report, PlanOverrides.from_settings(settings))
    plan.http_cpus[i], plan.model_cpus[j] # cores per worker; plan.pin_current_process("model", j)

`xcstack doctor` (xcstack.platform.cli) prints both. Nothing heavy is imported here.
"""

from xcstack.platform.buildflags import BuildFlags, FlagCheck, build_flags, check_cflags
from xcstack.platform.plan import TuningPlan, apply_affinity, derive_plan, plan_for_settings
from xcstack.platform.planning.overrides import PlanOverrides
from xcstack.platform.probe import PlatformReport, probe

__all__ = [
    "BuildFlags",
    "FlagCheck",
    "PlanOverrides",
    "PlatformReport",
    "TuningPlan",
    "apply_affinity",
    "build_flags",
    "check_cflags",
    "derive_plan",
    "plan_for_settings",
    "probe",
]
