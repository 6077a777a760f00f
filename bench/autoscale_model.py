"""KEDA and the HPA as arithmetic, read from deploy/k8s (for ``s2s.bench.autoscale``).

Nothing here starts a process: the ScaledObjects of ``deploy/k8s/keda.yaml`` are parsed
into :class:`Scaler` (triggers, ``scalingModifiers``, min/max, polling, the HPA
``behavior`` with Kubernetes' own defaults filled in), and :class:`Hpa` applies what
kube-controller-manager's HPA does with one external metric at every sync:

- AverageValue target (what KEDA configures for ``scalingModifiers`` and for a
  ``metricType: AverageValue`` trigger): ``usage = metric / (target * current)``; inside
  the tolerance (10 %: ``--horizontal-pod-autoscaler-tolerance``) nothing changes, else
  ``desired = ceil(metric / target)`` (``GetExternalPerPodMetricReplicas``);
- the stabilisation windows: up, the lowest recommendation of the window; down, the
  highest (``stabilizeRecommendationWithBehaviors``);
- the rate policies (``Pods``/``Percent`` per ``periodSeconds``, ``selectPolicy``
  Max/Min/Disabled) over the scale events of each period;
- min/max replicas;
- KEDA's activation: at 0 replicas the HPA does nothing; KEDA makes it 1 when the metric
  passes the activation target, and 0 again after ``cooldownPeriod`` inactive (only
  when ``minReplicaCount`` is 0, which no s2s manifest uses).

Defaults when a manifest leaves them out are Kubernetes' (``pkg/apis/autoscaling/v2/
defaults.go``): up, no window and the larger of +4 pods or +100 % per 15 s; down, a
300 s window (the controller's ``--horizontal-pod-autoscaler-downscale-stabilization``)
and -100 % per 15 s.  ``compress`` divides every window and policy period, so that a
bench fits in minutes, but a stabilisation window never below ``min_window`` (or its own
length, if shorter): a window shorter than the HPA's sync period would stabilise nothing.
The caller says so in its output.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

TOLERANCE = 0.1           # kube-controller-manager --horizontal-pod-autoscaler-tolerance
SYNC_PERIOD_S = 15.0      # kube-controller-manager --horizontal-pod-autoscaler-sync-period
DOWN_WINDOW_S = 300.0     # kube-controller-manager --horizontal-pod-autoscaler-downscale-stabilization
KEDA_POLLING_S = 30.0     # ScaledObject pollingInterval default
KEDA_COOLDOWN_S = 300.0   # ScaledObject cooldownPeriod default (to zero only)
DEFAULT_UP = {"stabilizationWindowSeconds": 0, "selectPolicy": "Max",
              "policies": [{"type": "Pods", "value": 4, "periodSeconds": 15},
                           {"type": "Percent", "value": 100, "periodSeconds": 15}]}
DEFAULT_DOWN = {"stabilizationWindowSeconds": DOWN_WINDOW_S, "selectPolicy": "Max",
                "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15}]}


# --- the manifests -----------------------------------------------------------------------
def manifests(k8s_dir: Path) -> list[dict]:
    """Every document of the kustomization's resources, in order."""
    try:
        import yaml
    except ImportError:  # pragma: no cover
        raise SystemExit("reading deploy/k8s needs PyYAML: pip install pyyaml") from None
    kustomization = yaml.safe_load((k8s_dir / "kustomization.yaml").read_text())
    return [doc for resource in kustomization["resources"]
            for doc in yaml.safe_load_all((k8s_dir / resource).read_text()) if doc]


def by_kind(docs: Iterable[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d.get("kind") == kind}


@dataclass
class Rules:
    """One direction of an HPA's ``behavior``, Kubernetes' defaults filled in."""
    window_s: float
    select: str                    # Max, Min or Disabled
    policies: list[tuple[str, int, float]]   # (Pods|Percent, value, periodSeconds)

    @classmethod
    def parse(cls, given: dict | None, default: dict, compress: float = 1.0,
              min_window: float = 0.0) -> "Rules":
        given = given or {}
        window = float(given.get("stabilizationWindowSeconds",
                                 default["stabilizationWindowSeconds"]))
        policies = given.get("policies") or default["policies"]
        window = max(window / compress, min(window, min_window))
        return cls(window, given.get("selectPolicy", default["selectPolicy"]),
                   [(p["type"], int(p["value"]), float(p["periodSeconds"]) / compress)
                    for p in policies])


@dataclass
class Trigger:
    name: str
    type: str                      # redis-streams or prometheus
    metadata: dict[str, str]
    metric_type: str = "AverageValue"

    def target(self) -> float:
        m = self.metadata
        for key in ("pendingEntriesCount", "lagCount", "streamLength", "threshold"):
            if key in m:
                return float(m[key])
        raise ValueError(f"trigger {self.name}: no target in {m}")

    def activation(self) -> float:
        m = self.metadata
        for key in ("activationPendingEntriesCount", "activationLagCount",
                    "activationStreamLength", "activationThreshold"):
            if key in m:
                return float(m[key])
        return 0.0


@dataclass
class Scaler:
    """A ScaledObject: what KEDA reads and hands the HPA, and the HPA's settings."""
    name: str                      # the Deployment it scales
    min_replicas: int
    max_replicas: int
    polling_s: float
    cooldown_s: float
    triggers: list[Trigger]
    formula: str | None            # scalingModifiers.formula (None: a single trigger)
    target: float                  # the AverageValue target the HPA gets
    activation: float
    metric_type: str
    up: Rules
    down: Rules

    @classmethod
    def parse(cls, obj: dict, compress: float = 1.0, min_window: float = 0.0) -> "Scaler":
        spec = obj["spec"]
        advanced = spec.get("advanced") or {}
        triggers = [Trigger(t.get("name", f"s{i}"), t["type"], dict(t.get("metadata") or {}),
                            t.get("metricType", "AverageValue"))
                    for i, t in enumerate(spec["triggers"])]
        mod = advanced.get("scalingModifiers")
        if mod:
            formula, target = mod["formula"], float(mod["target"])
            activation = float(mod.get("activationTarget", 0))
            metric_type = mod.get("metricType", "AverageValue")
        else:
            if len(triggers) != 1:
                raise ValueError(f"{obj['metadata']['name']}: several triggers without a "
                                 "formula (the HPA would take the largest): not modelled")
            formula, target = None, triggers[0].target()
            activation, metric_type = triggers[0].activation(), triggers[0].metric_type
        if metric_type != "AverageValue":
            raise ValueError(f"{obj['metadata']['name']}: metricType {metric_type} not modelled")
        behavior = (advanced.get("horizontalPodAutoscalerConfig") or {}).get("behavior") or {}
        return cls(obj["metadata"]["name"] if "scaleTargetRef" not in spec
                   else spec["scaleTargetRef"]["name"],
                   int(spec.get("minReplicaCount", 0)), int(spec.get("maxReplicaCount", 100)),
                   float(spec.get("pollingInterval", KEDA_POLLING_S)),
                   float(spec.get("cooldownPeriod", KEDA_COOLDOWN_S)),
                   triggers, formula, target, activation, metric_type,
                   Rules.parse(behavior.get("scaleUp"), DEFAULT_UP, compress, min_window),
                   Rules.parse(behavior.get("scaleDown"), DEFAULT_DOWN, compress, min_window))

    def value(self, readings: dict[str, float]) -> float:
        """The metric KEDA hands the HPA: the formula over the triggers' readings."""
        if self.formula is None:
            return float(readings[self.triggers[0].name])
        return formula_value(self.formula, readings)

    def scaled(self, sessions: float) -> "Scaler":
        """This scaler with its target and activation divided by ``sessions`` (the
        bench's session scale: one simulated session stands for that many)."""
        import dataclasses

        return dataclasses.replace(self, target=self.target / sessions,
                                   activation=self.activation / sessions)

    def describe(self) -> dict[str, Any]:
        return {"min": self.min_replicas, "max": self.max_replicas,
                "polling_s": self.polling_s, "formula": self.formula or self.triggers[0].name,
                "target": self.target, "activation": self.activation,
                "scale_up": {"window_s": self.up.window_s, "select": self.up.select,
                             "policies": self.up.policies},
                "scale_down": {"window_s": self.down.window_s, "select": self.down.select,
                               "policies": self.down.policies}}


def scalers(k8s_dir: Path, compress: float = 1.0, min_window: float = 0.0
            ) -> dict[str, Scaler]:
    return {name: Scaler.parse(obj, compress, min_window)
            for name, obj in by_kind(manifests(k8s_dir), "ScaledObject").items()}


def formula_value(formula: str, values: dict[str, float]) -> float:
    """KEDA's scalingModifiers formula (expr-lang) over the readings by trigger name; only
    + - * / and parentheses of names and numbers are accepted here (all the manifests use)."""
    tree = ast.parse(formula, mode="eval")
    allowed = (ast.Expression, ast.BinOp, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Name,
               ast.Load, ast.Constant, ast.UnaryOp, ast.USub)
    bad = [type(n).__name__ for n in ast.walk(tree) if not isinstance(n, allowed)]
    if bad:
        raise ValueError(f"formula {formula!r}: {bad[0]} not modelled")
    return float(eval(compile(tree, "<formula>", "eval"), {"__builtins__": {}}, dict(values)))


# --- what KEDA's scalers read --------------------------------------------------------------
def redis_streams_reading(xinfo_groups: list[dict], xpending_count: int | None,
                          xlen: int, meta: dict[str, str]) -> float:
    """One redis-streams trigger as KEDA's scaler reads it: ``lagCount`` -> the group's
    ``lag`` (XINFO GROUPS); else with a ``consumerGroup`` -> XPENDING's count; else XLEN."""
    if "lagCount" in meta:
        for group in xinfo_groups:
            name = group["name"]
            if (name.decode() if isinstance(name, bytes) else name) == meta["consumerGroup"]:
                return float(group.get("lag") or 0)
        return 0.0  # no group yet: nothing read, nothing waiting on it
    if "consumerGroup" in meta:
        return float(xpending_count or 0)
    return float(xlen)


# --- the HPA --------------------------------------------------------------------------------
@dataclass
class Hpa:
    """One HPA (plus KEDA's activation) over time.  ``sync(now, metric, current)``
    returns the replicas the Deployment should have after this sync."""
    scaler: Scaler
    tolerance: float = TOLERANCE
    recommendations: list[tuple[float, int]] = field(default_factory=list)
    events: list[tuple[float, int]] = field(default_factory=list)   # (when, +added/-removed)
    last_active: float = 0.0
    last: dict[str, Any] = field(default_factory=dict)

    def raw_desired(self, metric: float, current: int) -> int:
        """GetExternalPerPodMetricReplicas: the tolerance, then ceil(metric / target)."""
        s = self.scaler
        if current <= 0:
            return 0
        usage = metric / (s.target * current)
        if abs(1.0 - usage) <= self.tolerance:
            return current
        return int(math.ceil(metric / s.target - 1e-9))

    def sync(self, now: float, metric: float, current: int) -> int:
        s = self.scaler
        active = metric > s.activation
        if active:
            self.last_active = now
        # KEDA owns 0 <-> 1 (activation); the HPA never acts on a target at 0 replicas
        if current == 0:
            desired = 1 if active and s.max_replicas > 0 else 0
            self.last = {"metric": metric, "raw": desired, "desired": desired,
                         "active": active, "why": "activation" if desired else "inactive"}
            return desired  # KEDA's own scaling: not one of the HPA's scale events
        if s.min_replicas == 0 and not active and now - self.last_active >= s.cooldown_s:
            self.last = {"metric": metric, "raw": 0, "desired": 0, "active": False,
                         "why": "cooldown"}
            return 0
        raw = self.raw_desired(metric, current)
        raw = max(raw, 1)  # the HPA's own minReplicas is KEDA's min or 1
        desired, why = self._normalize(now, raw, current)
        self.last = {"metric": metric, "raw": raw, "desired": desired, "active": active,
                     "why": why}
        if desired != current:
            self.events.append((now, desired - current))
        return desired

    # normalizeDesiredReplicasWithBehaviors
    def _normalize(self, now: float, raw: int, current: int) -> tuple[int, str]:
        s = self.scaler
        stabilized = self._stabilize(now, raw, current)
        why = "stabilized" if stabilized != raw else "metric"
        lo, hi = max(s.min_replicas, 1), s.max_replicas
        desired = stabilized
        if desired > current:
            limit = self._up_limit(now, current)
            limit = min(max(limit, current), hi)
            if desired > limit:
                desired, why = limit, "max" if limit == hi else "scale-up policy"
        elif desired < current:
            limit = self._down_limit(now, current)
            limit = max(min(limit, current), lo)
            if desired < limit:
                desired, why = limit, "min" if limit == lo else "scale-down policy"
        desired = max(lo, min(hi, desired))
        return desired, why

    def _stabilize(self, now: float, raw: int, current: int) -> int:
        up_cut, down_cut = now - self.scaler.up.window_s, now - self.scaler.down.window_s
        up_rec = down_rec = raw
        for when, rec in self.recommendations:
            if when > up_cut:
                up_rec = min(up_rec, rec)
            if when > down_cut:
                down_rec = max(down_rec, rec)
        keep = max(self.scaler.up.window_s, self.scaler.down.window_s)
        self.recommendations = [(w, r) for w, r in self.recommendations if w > now - keep]
        self.recommendations.append((now, raw))
        recommendation = current
        if recommendation < up_rec:
            recommendation = up_rec
        if recommendation > down_rec:
            recommendation = down_rec
        return recommendation

    def _changed(self, now: float, period: float, sign: int) -> int:
        return sum(abs(d) for when, d in self.events
                   if when > now - period and (d > 0) == (sign > 0) and d != 0)

    def _up_limit(self, now: float, current: int) -> int:
        rules = self.scaler.up
        if rules.select == "Disabled":
            return current
        pick = min if rules.select == "Min" else max
        result = None
        for kind, value, period in rules.policies:
            start = current - self._changed(now, period, +1)
            proposed = start + value if kind == "Pods" else \
                int(math.ceil(start * (1 + value / 100)))
            result = proposed if result is None else pick(result, proposed)
        return current if result is None else result

    def _down_limit(self, now: float, current: int) -> int:
        rules = self.scaler.down
        if rules.select == "Disabled":
            return current
        pick = max if rules.select == "Min" else min
        result = None
        for kind, value, period in rules.policies:
            start = current + self._changed(now, period, -1)
            proposed = start - value if kind == "Pods" else int(start * (1 - value / 100))
            result = proposed if result is None else pick(result, proposed)
        return current if result is None else result
