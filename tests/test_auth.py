"""API keys on every RPC of every service, through real servers and real channels.

A cluster with auth on (dataset with its AuthService, trainer, predictor on the tiny
model) is called RPC by RPC, the RPCs enumerated from the services' descriptors, so a
new RPC without an access rule fails here: without a key, with a revoked or expired one,
with another app's key, with a read-only key, and on internal RPCs with user keys.
"""

from __future__ import annotations

import asyncio
import importlib
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message_factory import GetMessageClass

from loraforge.auth.v1 import auth_service_pb2 as apb
from loraforge.auth.v1 import auth_service_pb2_grpc as apb_grpc
from loraforge.dataset.v1 import dataset_service_pb2 as dpb
from loraforge.dataset.v1 import dataset_service_pb2_grpc as dpb_grpc
from loraforge.predictor.v1 import predictor_service_pb2 as ppb
from loraforge.services.common.auth import (
    ADMIN,
    READ,
    CachingVerifier,
    On,
    Principal,
    is_loopback,
    parse_service_keys,
    unknown_key,
)
from loraforge.services.common.errors import InvalidArgument, Unauthenticated
from loraforge.services.common.policy import POLICY
from loraforge.trainer.v1 import trainer_service_pb2 as tpb
from tests.support import (
    REPO,
    ServiceProcess,
    channel,
    error_details,
    start_keyed_services,
    start_service,
    wait_until,
)
from tests.test_predictor_helpers import tiny_base

# Where each service is hosted (the dataset process hosts AuthService), by its label.
HOSTED = {
    "loraforge.dataset.v1.DatasetService": ("dataset", "dataset"),
    "loraforge.auth.v1.AuthService": ("auth", "dataset"),
    "loraforge.trainer.v1.TrainerService": ("trainer", "trainer"),
    "loraforge.predictor.v1.PredictorService": ("predictor", "predictor"),
}


def _generated_services() -> dict[str, ServiceDescriptor]:
    """Every service of every generated proto module, by full name."""
    root = REPO / "gen" / "loraforge"
    found: dict[str, ServiceDescriptor] = {}
    for path in sorted(root.rglob("*_pb2.py")):
        parts = path.relative_to(root).with_suffix("").parts
        module = importlib.import_module(".".join(("loraforge", *parts)))
        for service in module.DESCRIPTOR.services_by_name.values():
            found[service.full_name] = service
    return found


GENERATED = _generated_services()
SERVICES: dict[str, ServiceDescriptor] = {
    label: GENERATED[name] for name, (label, _) in HOSTED.items() if name in GENERATED
}
HOST = {label: host for label, host in HOSTED.values()}
# Rules written as functions, and the request fields their apps come from.
_TRAINER = "/loraforge.trainer.v1.TrainerService/"
APP_FIELDS = {
    _TRAINER + "CreateModelVersion": ("parent", "dataset_version", "from_model_version"),
    _TRAINER + "EstimateModelVersion": ("parent", "dataset_version", "from_model_version"),
    _TRAINER + "CreateEvaluation": ("parent", "dataset_version"),
    _TRAINER + "CompareEvaluations": ("evaluation", "other"),
    "/loraforge.predictor.v1.PredictorService/Predict": ("model",),
    "/loraforge.predictor.v1.PredictorService/PredictStream": ("model",),
}
REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


def every_method() -> list[tuple[str, MethodDescriptor]]:
    return [(svc, m) for svc, d in SERVICES.items() for m in d.methods]


def path_of(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def app_fields(method: MethodDescriptor) -> tuple[str, ...]:
    """The request fields an RPC's rule reads apps from (empty: it names no app)."""
    path = path_of(method)
    if path in APP_FIELDS:
        return APP_FIELDS[path]
    needs = POLICY[path].needs
    return needs.paths if isinstance(needs, On) else ()


def request_for(method: MethodDescriptor, app: str = "") -> Any:
    """An empty request of `method`, its app fields naming resources of `app`."""
    request = GetMessageClass(method.input_type)()
    for field in app_fields(method) if app else ():
        *parents, leaf = field.split(".")
        target = request
        for part in parents:
            target = getattr(target, part)
        setattr(target, leaf, f"apps/{app}/things/x/versions/v")
    return request


@dataclass
class Cluster:
    dataset: ServiceProcess
    trainer: ServiceProcess
    predictor: ServiceProcess
    admin_key: str
    service_keys: dict[str, str]
    home: Path
    channels: dict[str, grpc.Channel]

    def call(self, service: str, method: MethodDescriptor, request: Any, key: str | None) -> Any:
        """Calls `method` like any client would; returns the response or raises RpcError."""
        channel_ = self.channels[HOST[service]]
        path = path_of(method)
        response_class = GetMessageClass(method.output_type)
        metadata = [("authorization", f"Bearer {key}")] if key else None
        common = {
            "request_serializer": lambda m: m.SerializeToString(),
            "response_deserializer": response_class.FromString,
        }
        if method.client_streaming and not method.server_streaming:
            return channel_.stream_unary(path, **common)(
                iter([request]), metadata=metadata, timeout=30
            )
        if method.server_streaming:
            return list(
                channel_.unary_stream(path, **common)(request, metadata=metadata, timeout=30)
            )
        return channel_.unary_unary(path, **common)(request, metadata=metadata, timeout=30)

    def code(
        self, service: str, method: MethodDescriptor, request: Any, key: str | None
    ) -> grpc.StatusCode:
        try:
            self.call(service, method, request, key)
        except grpc.RpcError as err:
            return err.code()
        return grpc.StatusCode.OK

    def auth(self, key: str | None = None) -> apb_grpc.AuthServiceStub:
        return apb_grpc.AuthServiceStub(self.channels["dataset"])

    def create_key(self, app: str, scopes: list[str], ttl: float = 0) -> str:
        request = apb.CreateApiKeyRequest(app=app, scopes=scopes)
        if ttl:
            request.ttl.CopyFrom(duration_pb2.Duration(seconds=int(ttl)))
        response = self.auth().CreateApiKey(request, metadata=bearer(self.admin_key))
        return response.secret


def bearer(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("auth")
    base = tiny_base(workdir)
    started: list[ServiceProcess] = []
    try:
        keyed = start_keyed_services(workdir, base, started)
        dataset, trainer, predictor = keyed.dataset, keyed.trainer, keyed.predictor
        service_keys, admin_key = keyed.service_keys, keyed.admin_key
        home = workdir / "home"
        channels = {
            "dataset": channel(dataset.address),
            "trainer": channel(trainer.address),
            "predictor": channel(predictor.address),
        }
        result = Cluster(dataset, trainer, predictor, admin_key, service_keys, home, channels)
        stub = dpb_grpc.DatasetServiceStub(channels["dataset"])
        for app in ("a", "b"):
            stub.CreateApp(dpb.CreateAppRequest(app_id=app), metadata=bearer(admin_key))
        yield result
    finally:
        for service in reversed(started):
            service.stop()


def test_every_generated_service_is_hosted_and_called_here() -> None:
    assert set(GENERATED) == set(HOSTED), "a service this test does not know where to call"


def test_every_rule_that_reads_apps_from_a_request_is_tested_across_apps() -> None:
    """A rule written as a function names its fields in APP_FIELDS; the others name no app."""
    for _, method in every_method():
        path = path_of(method)
        needs = POLICY[path].needs
        if isinstance(needs, On) or path in APP_FIELDS:
            continue
        empty = GetMessageClass(method.input_type)()
        try:
            apps = {app for _, app in needs(empty)}
        except InvalidArgument:
            pytest.fail(f"{path} reads an app from its request: list its fields in APP_FIELDS")
        assert apps <= {"*"}, path


def test_every_rpc_of_every_service_has_an_access_rule() -> None:
    paths = {path_of(m) for _, m in every_method()}
    missing = sorted(paths - POLICY.keys())
    assert not missing, f"RPCs without an access rule: {missing}"
    assert not sorted(POLICY.keys() - paths), "rules for RPCs that do not exist"


@pytest.mark.parametrize(("service", "method"), every_method(), ids=lambda v: getattr(v, "name", v))
def test_a_call_without_a_key_is_unauthenticated(
    cluster: Cluster, service: str, method: MethodDescriptor
) -> None:
    try:
        cluster.call(service, method, request_for(method, "a"), None)
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "authorization: Bearer" in (err.details() or "")
        assert error_details(err)[0] == "MISSING_API_KEY"
    else:
        pytest.fail(f"{method.name} answered a call without a key")


def test_health_and_reflection_stay_open_without_a_key(cluster: Cluster) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    for ch in cluster.channels.values():
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_a_malformed_or_unknown_key_is_unauthenticated_on_every_service(cluster: Cluster) -> None:
    get_app = SERVICES["dataset"].methods_by_name["GetApp"]
    for bad in ("not-a-key", "lf_000000000000_" + "x" * 43, cluster.admin_key + "x"):
        for service, method in [
            ("dataset", get_app),
            ("trainer", SERVICES["trainer"].methods_by_name["ListTemplates"]),
            ("predictor", SERVICES["predictor"].methods_by_name["GetServingInfo"]),
        ]:
            assert cluster.code(service, method, request_for(method, "a"), bad) == (
                grpc.StatusCode.UNAUTHENTICATED
            ), (service, bad)


def _refused_everywhere(cluster: Cluster, key: str) -> bool:
    return all(
        cluster.code(service, method, request_for(method, "a"), key)
        == grpc.StatusCode.UNAUTHENTICATED
        for service, method in every_method()
    )


def test_a_revoked_key_is_unauthenticated_on_every_rpc(cluster: Cluster) -> None:
    key = cluster.create_key("apps/a", ["read", "write", "train", "predict"])
    probes = [
        ("dataset", "ListDatasets", dpb.ListDatasetsRequest(parent="apps/a")),
        ("trainer", "ListModels", tpb.ListModelsRequest(parent="apps/a")),
        ("predictor", "ListAdapters", ppb.ListAdaptersRequest()),
    ]
    for service, name, request in probes:  # works, and is now in the other services' caches
        method = SERVICES[service].methods_by_name[name]
        assert cluster.code(service, method, request, key) == grpc.StatusCode.OK, name
    prefix = key[:15]
    revoked = cluster.auth().RevokeApiKey(
        apb.RevokeApiKeyRequest(name=prefix), metadata=bearer(cluster.admin_key)
    )
    assert revoked.api_key.HasField("revoke_time")
    # The other services trust their cached answer for auth_cache_seconds (0.3 s here).
    assert wait_until(lambda: _refused_everywhere(cluster, key), timeout=30)


def test_an_expired_key_is_unauthenticated_on_every_rpc(cluster: Cluster) -> None:
    key = cluster.create_key("apps/a", ["read"], ttl=1)
    listing = cluster.auth().ListApiKeys(
        apb.ListApiKeysRequest(app="apps/a"), metadata=bearer(cluster.admin_key)
    )
    assert any(k.prefix == key[:15] and k.HasField("expire_time") for k in listing.api_keys)
    assert wait_until(lambda: _refused_everywhere(cluster, key), timeout=30)
    inactive = cluster.auth().ListApiKeys(
        apb.ListApiKeysRequest(app="apps/a"), metadata=bearer(cluster.admin_key)
    )
    assert all(k.prefix != key[:15] for k in inactive.api_keys)


def test_a_key_lifetime_beyond_any_calendar_is_invalid_argument_not_an_overflow(
    cluster: Cluster,
) -> None:
    for seconds in (2**62, 101 * 365 * 86400):
        request = apb.CreateApiKeyRequest(
            app="apps/a", scopes=["read"], ttl=duration_pb2.Duration(seconds=seconds)
        )
        with pytest.raises(grpc.RpcError) as info:
            cluster.auth().CreateApiKey(request, metadata=bearer(cluster.admin_key))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "ttl" in (info.value.details() or "") and "days" in (info.value.details() or "")


def _app_bound() -> list[tuple[str, MethodDescriptor]]:
    return [(svc, m) for svc, m in every_method() if POLICY[path_of(m)].users and app_fields(m)]


@pytest.mark.parametrize(("service", "method"), _app_bound(), ids=lambda v: getattr(v, "name", v))
def test_a_key_of_app_a_is_denied_on_app_b_whether_or_not_the_resource_exists(
    cluster: Cluster, service: str, method: MethodDescriptor
) -> None:
    key = _full_key(cluster)
    for app in ("b", "nonexistent"):
        try:
            cluster.call(service, method, request_for(method, app), key)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, (app, err.details())
            assert f"apps/{app}" in (err.details() or "")
        else:
            pytest.fail(f"{method.name} on apps/{app} answered app a's key")


_KEYS: dict[str, str] = {}


def _full_key(cluster: Cluster) -> str:
    if "full" not in _KEYS:
        _KEYS["full"] = cluster.create_key("apps/a", ["read", "write", "train", "predict"])
    return _KEYS["full"]


def _read_key(cluster: Cluster) -> str:
    if "read" not in _KEYS:
        _KEYS["read"] = cluster.create_key("apps/a", ["read"])
    return _KEYS["read"]


@pytest.mark.parametrize(("service", "method"), _app_bound(), ids=lambda v: getattr(v, "name", v))
def test_a_read_only_key_reads_but_cannot_write_train_delete_or_predict(
    cluster: Cluster, service: str, method: MethodDescriptor
) -> None:
    request = request_for(method, "a")
    scopes = {scope for scope, _ in POLICY[path_of(method)].needs(request)}
    code = cluster.code(service, method, request, _read_key(cluster))
    if scopes == {READ}:
        assert code not in REFUSED, f"{method.name} refused a read key: {code}"
    else:
        assert code == grpc.StatusCode.PERMISSION_DENIED, f"{method.name} needs {scopes}"


def test_only_an_admin_key_creates_and_deletes_apps_and_manages_keys(cluster: Cluster) -> None:
    admin_only = [
        (
            "dataset",
            SERVICES["dataset"].methods_by_name["CreateApp"],
            dpb.CreateAppRequest(app_id="c"),
        ),
        (
            "dataset",
            SERVICES["dataset"].methods_by_name["DeleteApp"],
            dpb.DeleteAppRequest(name="apps/a"),
        ),
        (
            "auth",
            SERVICES["auth"].methods_by_name["CreateApiKey"],
            apb.CreateApiKeyRequest(app="apps/a", scopes=["read"]),
        ),
        ("auth", SERVICES["auth"].methods_by_name["ListApiKeys"], apb.ListApiKeysRequest()),
        (
            "auth",
            SERVICES["auth"].methods_by_name["RevokeApiKey"],
            apb.RevokeApiKeyRequest(name="apiKeys/000000000000"),
        ),
    ]
    for service, method, request in admin_only:
        code = cluster.code(service, method, request, _full_key(cluster))
        assert code == grpc.StatusCode.PERMISSION_DENIED, method.name
    created = cluster.auth().CreateApiKey(
        apb.CreateApiKeyRequest(app="apps/b", scopes=["read"]), metadata=bearer(cluster.admin_key)
    )
    assert created.secret.startswith(created.api_key.prefix + "_")
    listed = cluster.auth().ListApiKeys(
        apb.ListApiKeysRequest(), metadata=bearer(cluster.admin_key)
    )
    assert created.api_key.name in {k.name for k in listed.api_keys}
    assert all(created.secret not in str(k) for k in listed.api_keys)


def test_an_app_key_lists_only_its_own_app_and_adapters(cluster: Cluster) -> None:
    stub = dpb_grpc.DatasetServiceStub(cluster.channels["dataset"])
    mine = stub.ListApps(dpb.ListAppsRequest(), metadata=bearer(_read_key(cluster)))
    assert [a.name for a in mine.apps] == ["apps/a"]
    every = stub.ListApps(dpb.ListAppsRequest(), metadata=bearer(cluster.admin_key))
    assert {"apps/a", "apps/b"} <= {a.name for a in every.apps}
    who = cluster.auth().WhoAmI(apb.WhoAmIRequest(), metadata=bearer(_read_key(cluster)))
    assert (who.principal.app, list(who.principal.scopes)) == ("apps/a", ["read"])


def test_internal_rpcs_refuse_user_keys_and_other_services(cluster: Cluster) -> None:
    methods = SERVICES["dataset"].methods_by_name
    forged = dpb.RemoveDatasetVersionReferenceRequest(
        name="apps/a/datasets/d/versions/v", referrer="apps/b/models/m/versions/v"
    )
    for key in (cluster.admin_key, _full_key(cluster), cluster.service_keys["predictor"]):
        for name, request in [
            ("RemoveDatasetVersionReference", forged),
            (
                "AddDatasetVersionReference",
                dpb.AddDatasetVersionReferenceRequest(name=forged.name, referrer=forged.referrer),
            ),
        ]:
            assert (
                cluster.code("dataset", methods[name], request, key)
                == grpc.StatusCode.PERMISSION_DENIED
            )
        verify = SERVICES["auth"].methods_by_name["VerifyApiKey"]
        if key != cluster.service_keys["predictor"]:
            code = cluster.code("auth", verify, apb.VerifyApiKeyRequest(key=cluster.admin_key), key)
            assert code == grpc.StatusCode.PERMISSION_DENIED
    # The trainer's own identity may: the version does not exist, so NOT_FOUND, not a refusal.
    code = cluster.code(
        "dataset", methods["RemoveDatasetVersionReference"], forged, cluster.service_keys["trainer"]
    )
    assert code == grpc.StatusCode.NOT_FOUND
    # A service identity is not a user: it cannot delete an app.
    delete = methods["DeleteApp"]
    assert cluster.code(
        "dataset", delete, dpb.DeleteAppRequest(name="apps/a"), cluster.service_keys["worker"]
    ) == (grpc.StatusCode.PERMISSION_DENIED)


def test_the_admin_key_file_is_owner_only_and_keys_are_stored_only_as_hashes(
    cluster: Cluster,
) -> None:
    key_file = cluster.home / "admin.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    key = cluster.create_key("apps/a", ["read"])
    secret = key[16:]
    with sqlite3.connect(cluster.home / "dataset.db") as db:
        rows = db.execute("SELECT key_id, key_hash FROM api_keys").fetchall()
        assert rows and all(len(h) == 64 for _, h in rows)
    for path in cluster.home.glob("dataset.db*"):
        data = path.read_bytes()
        assert secret.encode() not in data and cluster.admin_key.encode() not in data, path


def test_a_bad_scope_or_missing_app_is_invalid_argument_naming_the_field(cluster: Cluster) -> None:
    cases = [
        (apb.CreateApiKeyRequest(app="apps/a", scopes=["delete"]), "scopes"),
        (apb.CreateApiKeyRequest(app="apps/a", scopes=[ADMIN]), "scopes"),
        (apb.CreateApiKeyRequest(scopes=["read"]), "app"),
        (apb.CreateApiKeyRequest(app="apps/a"), "scopes"),
    ]
    for request, field in cases:
        with pytest.raises(grpc.RpcError) as info:
            cluster.auth().CreateApiKey(request, metadata=bearer(cluster.admin_key))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in error_details(info.value)[1], info.value.details()
    with pytest.raises(grpc.RpcError) as missing:
        cluster.auth().CreateApiKey(
            apb.CreateApiKeyRequest(app="apps/ghost", scopes=["read"]),
            metadata=bearer(cluster.admin_key),
        )
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def test_deleting_an_app_revokes_its_keys(cluster: Cluster) -> None:
    stub = dpb_grpc.DatasetServiceStub(cluster.channels["dataset"])
    stub.CreateApp(dpb.CreateAppRequest(app_id="temp"), metadata=bearer(cluster.admin_key))
    key = cluster.create_key("apps/temp", ["read"])
    stub.GetApp(dpb.GetAppRequest(name="apps/temp"), metadata=bearer(key))
    stub.DeleteApp(dpb.DeleteAppRequest(name="apps/temp"), metadata=bearer(cluster.admin_key))
    stub.CreateApp(dpb.CreateAppRequest(app_id="temp"), metadata=bearer(cluster.admin_key))
    with pytest.raises(grpc.RpcError) as info:
        stub.GetApp(dpb.GetAppRequest(name="apps/temp"), metadata=bearer(key))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _run(
    module: str, home: Path, *args: str, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", module, "--port", "0", *args],
        env={**os.environ, "LORAFORGE_HOME": str(home), **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_public_address_without_tls_or_with_auth_off_is_refused_with_the_reason(
    tmp_path: Path,
) -> None:
    plain = _run(
        "loraforge.services.dataset", tmp_path, "--host", "0.0.0.0", env={"LORAFORGE_AUTH": "on"}
    )
    assert plain.returncode == 2
    assert "refusing to listen on 0.0.0.0" in plain.stdout and "no TLS" in plain.stdout
    open_ = _run(
        "loraforge.services.trainer",
        tmp_path,
        *("--host", "0.0.0.0", "--dataset-address", "127.0.0.1:1"),
        env={"LORAFORGE_AUTH": "off"},
    )
    assert open_.returncode == 2 and "auth is off" in open_.stdout


def test_the_trainer_with_auth_on_and_no_service_key_says_which_setting_is_missing(
    tmp_path: Path,
) -> None:
    done = _run(
        "loraforge.services.trainer",
        tmp_path,
        "--dataset-address",
        "127.0.0.1:1",
        env={"LORAFORGE_AUTH": "on"},
    )
    assert done.returncode == 2 and "--service-key" in done.stdout


def test_a_public_address_is_allowed_with_insecure_and_says_so(tmp_path: Path) -> None:
    service = start_service(
        "loraforge.services.dataset",
        tmp_path,
        args=["--host", "0.0.0.0", "--insecure", "true"],
        env={"LORAFORGE_AUTH": "off"},
    )
    try:
        assert "--insecure is set" in service.log()
    finally:
        service.stop()


# The cache and the settings parsers, in process.


def test_the_cache_asks_once_per_key_within_its_time_and_again_after() -> None:
    now = [0.0]
    asked: list[str] = []

    async def lookup(key: str) -> Principal:
        asked.append(key)
        if key == "bad":
            raise unknown_key()
        return Principal(name="apiKeys/x", app="a", scopes=frozenset({"read"}))

    cache = CachingVerifier(lookup, ttl=30, clock=lambda: now[0])

    async def scenario() -> None:
        for _ in range(5):
            await cache.verify("good")
        assert asked == ["good"]
        now[0] = 31
        await cache.verify("good")
        assert asked == ["good", "good"]
        for _ in range(3):
            with pytest.raises(Unauthenticated):
                await cache.verify("bad")
        assert asked.count("bad") == 1  # refusals are remembered too, for less time
        now[0] = 40
        with pytest.raises(Unauthenticated):
            await cache.verify("bad")
        assert asked.count("bad") == 2

    asyncio.run(scenario())


def test_a_cached_key_stops_working_at_its_expiry() -> None:
    wall = [1000.0]

    async def lookup(key: str) -> Principal:
        return Principal(name="apiKeys/x", app="a", scopes=frozenset({"read"}), expire_time=1010.0)

    cache = CachingVerifier(lookup, ttl=3600, clock=lambda: wall[0], wall=lambda: wall[0])

    async def scenario() -> None:
        await cache.verify("k")
        wall[0] = 1011.0
        with pytest.raises(Unauthenticated):
            await cache.verify("k")

    asyncio.run(scenario())


def test_service_keys_are_checked_for_known_services_and_length() -> None:
    good = "x" * 40
    assert set(parse_service_keys(f"trainer={good}\n# note\npredictor={good}y", "s").values()) == {
        "trainer",
        "predictor",
    }
    with pytest.raises(InvalidArgument, match="not `service=KEY`"):
        parse_service_keys(f"root={good}", "s")
    with pytest.raises(InvalidArgument, match="shorter than"):
        parse_service_keys("worker=short", "s")


def test_loopback_hosts_are_told_from_public_ones() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "127.0.0.5"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "", "10.0.0.1", "example.com", "::"))
