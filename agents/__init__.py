"""Decision-making algorithms on the diffrl core; ``AGENTS`` maps each kind to (ConfigClass, AgentClass)."""

from __future__ import annotations

AGENTS: dict[str, tuple[type, type]] = {}

from agents.decision_diffuser import DecisionDiffuser, DecisionDiffuserConfig  # noqa: E402
from agents.diffuser import Diffuser, DiffuserConfig  # noqa: E402

AGENTS[Diffuser.kind] = (DiffuserConfig, Diffuser)
AGENTS[DecisionDiffuser.kind] = (DecisionDiffuserConfig, DecisionDiffuser)

from agents.diffusion_ql import DiffusionQL, DiffusionQLConfig  # noqa: E402
from agents.idql import IDQL, IDQLConfig  # noqa: E402
from agents.qgpo import QGPO, QGPOConfig  # noqa: E402

AGENTS[DiffusionQL.kind] = (DiffusionQLConfig, DiffusionQL)
AGENTS[QGPO.kind] = (QGPOConfig, QGPO)
AGENTS[IDQL.kind] = (IDQLConfig, IDQL)

from agents.baselines import GaussianBC, GaussianBCConfig  # noqa: E402
from agents.diffusion_bc import DiffusionBC, DiffusionBCConfig  # noqa: E402
from agents.diffusion_policy import DiffusionPolicy, DiffusionPolicyConfig  # noqa: E402

AGENTS[DiffusionBC.kind] = (DiffusionBCConfig, DiffusionBC)
AGENTS[DiffusionPolicy.kind] = (DiffusionPolicyConfig, DiffusionPolicy)
AGENTS[GaussianBC.kind] = (GaussianBCConfig, GaussianBC)

from agents.ddpo import DDPO, DDPOConfig  # noqa: E402

AGENTS[DDPO.kind] = (DDPOConfig, DDPO)
