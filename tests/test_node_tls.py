"""DICOM TLS of the node (``medfedpure listen --tls-*`` / ``--forward-tls-*``): real TLS associations on
loopback, certificates made here with ``cryptography`` (a CA, a server certificate for 127.0.0.1 and
localhost, client certificates, and a second, untrusted CA), none committed.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import socket
import ssl
import time
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from medfedpure.cli import app
from medfedpure.node import scp
from medfedpure.node.config import ForwardTarget, NodeConfig
from medfedpure.node.scp import DicomNode
from medfedpure.node.tls import client_context, server_context
from medfedpure.runtime.defender import Defender
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComprehensiveSRStorage, MRImageStorage, Verification
from typer.testing import CliRunner

MR = pydicom.data.get_testdata_file("MR_small.dcm")
TIMEOUT = 10


# -- certificates ----------------------------------------------------------------------------------

def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(folder: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[str, str]:
    c, k = folder / f"{stem}.crt", folder / f"{stem}.key"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return str(c), str(k)


def _ca(folder: Path, cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key, _write(folder, cn, cert, key)[0]


def _leaf(folder: Path, stem: str, ca: tuple, *, server: bool, days: float = 1.0) -> tuple[str, str]:
    ca_cert, ca_key, _ = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(stem)).issuer_name(ca_cert.subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(days=3))
         .not_valid_after(now + dt.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                               else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                            critical=False)
    return _write(folder, stem, b.sign(ca_key, hashes.SHA256()), key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("pki")
    ca, rogue = _ca(d, "hospital-ca"), _ca(d, "rogue-ca")
    out = {"ca": ca[2], "rogue_ca": rogue[2]}
    for stem, issuer, server in (("node", ca, True), ("pacs", ca, True), ("modality", ca, False),
                                 ("forwarder", ca, False), ("rogue-pacs", rogue, True), ("rogue-modality", rogue, False)):
        out[f"{stem}_cert"], out[f"{stem}_key"] = _leaf(d, stem, issuer, server=server)
    out["expired_cert"], out["expired_key"] = _leaf(d, "expired", ca, server=True, days=-1)
    encrypted = d / "encrypted.key"
    encrypted.write_bytes(serialization.load_pem_private_key(Path(out["node_key"]).read_bytes(), None).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")))
    out["encrypted_key"] = str(encrypted)
    garbage = d / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    out["garbage"] = str(garbage)
    return out


@pytest.fixture(scope="module")
def defender():
    d = Defender.default()
    yield d
    d.close()


def _scu_ae() -> AE:
    ae = AE(ae_title="MODALITY")
    for name in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
        setattr(ae, name, TIMEOUT)
    ae.add_requested_context(MRImageStorage)
    ae.add_requested_context(Verification)
    return ae


def _assoc(port: int, tls: tuple[str, str | None, str | None] | None):
    """An association to the node; ``tls``: (CA, client cert, client key), None: plain DICOM."""
    tls_args = None if tls is None else (client_context(*tls), "127.0.0.1")
    return _scu_ae().associate("127.0.0.1", port, ae_title="MEDFEDPURE", tls_args=tls_args)


class _TlsPacs:
    """A TLS Storage SCP standing in for the PACS: records each report and the peer's certificate."""

    def __init__(self, cert: str, key: str, ca: str | None) -> None:
        self.received: list[pydicom.Dataset] = []
        self.peer_cns: list[str] = []
        ae = AE(ae_title="PACS")
        ae.add_supported_context(ComprehensiveSRStorage)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        if ca is not None:
            ctx.load_verify_locations(ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        self.server = ae.start_server(("127.0.0.1", 0), block=False, ssl_context=ctx,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        self.port = self.server.server_address[1]

    def _on_store(self, event) -> int:
        sock = event.assoc.dul.socket.socket
        peer = sock.getpeercert() if isinstance(sock, ssl.SSLSocket) else None
        self.peer_cns.append(dict(x[0] for x in peer["subject"])["commonName"] if peer else "(plain)")
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.received.append(ds)
        return 0x0000

    def close(self) -> None:
        self.server.shutdown()


def _tls_node_config(pki: dict[str, str], **kw) -> NodeConfig:
    base = dict(port=0, tls_cert=pki["node_cert"], tls_key=pki["node_key"], tls_ca=pki["ca"],
                tls_require_client_cert=True)
    if "forward" not in kw:
        base["store"] = kw.pop("store", None) or "unused-reports"
    return NodeConfig(**{**base, **kw})


def _finding(sr: pydicom.Dataset) -> str:
    (code,) = [i for i in sr.ContentSequence if i.ValueType == "CODE"
               and i.ConceptNameCodeSequence[0].CodeMeaning == "Finding"]
    return str(code.ConceptCodeSequence[0].CodeMeaning)


# -- associations over TLS ---------------------------------------------------------------------------

def test_echo_and_store_over_tls_forward_the_report_over_tls(pki, defender):
    pacs = _TlsPacs(pki["pacs_cert"], pki["pacs_key"], ca=pki["ca"])  # the PACS requires a client cert too
    try:
        cfg = _tls_node_config(pki, forward=ForwardTarget("127.0.0.1", pacs.port, "PACS"), forward_timeout_s=TIMEOUT,
                               forward_tls_ca=pki["ca"], forward_tls_cert=pki["forwarder_cert"],
                               forward_tls_key=pki["forwarder_key"])
        with DicomNode(cfg, defender) as node:
            assert node.transport == " over TLS (client certificate required)"
            assert node.destination.endswith("over TLS")
            assoc = _assoc(node.port, (pki["ca"], pki["modality_cert"], pki["modality_key"]))
            assert assoc.is_established
            try:
                assert isinstance(assoc.dul.socket.socket, ssl.SSLSocket)
                assert assoc.dul.socket.socket.version() in ("TLSv1.2", "TLSv1.3")
                assert assoc.send_c_echo().Status == 0x0000
                sent = pydicom.dcmread(MR)
                assert assoc.send_c_store(sent).Status == 0x0000
            finally:
                assoc.release()
    finally:
        pacs.close()
    assert len(pacs.received) == 1 and pacs.peer_cns == ["forwarder"]  # the node showed its client certificate
    sr = pacs.received[0]
    assert sr.SOPClassUID == ComprehensiveSRStorage and sr.StudyInstanceUID == sent.StudyInstanceUID
    assert _finding(sr) == defender.run(sent).label


def _refusals(caplog) -> list[str]:
    """The node's one-line handshake refusals, checking that pynetdicom logged no ERROR (with a traceback)
    for the same failure on the node's side (the test's client may log its own end of it)."""
    refusals = [r.getMessage() for r in caplog.records
                if r.name == "medfedpure.node" and "TLS handshake" in r.getMessage()]
    for reason in (m.rsplit(": ", 1)[1] for m in refusals):
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR and reason in r.getMessage()]
        assert not errors, [r.getMessage() for r in errors]
    return refusals


def test_a_plain_association_to_a_tls_node_fails_and_the_node_keeps_serving(pki, defender, tmp_path, caplog):
    with caplog.at_level(logging.DEBUG), DicomNode(_tls_node_config(pki, store=str(tmp_path)), defender) as node:
        plain = _assoc(node.port, None)
        assert not plain.is_established
        assoc = _assoc(node.port, (pki["ca"], pki["modality_cert"], pki["modality_key"]))
        assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
        assoc.release()
    (refusal,) = _refusals(caplog)
    assert refusal.startswith("TLS handshake with 127.0.0.1:") and "WRONG_VERSION_NUMBER" in refusal
    assert any("client certificate: commonName=modality" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("client", "established"), [
    ("none", False),      # no certificate while one is required
    ("rogue", False),     # a certificate from a CA the node does not trust
    ("modality", True),
])
def test_client_certificates_are_required_and_verified(pki, defender, tmp_path, caplog, client, established):
    cert = {"none": (None, None), "rogue": (pki["rogue-modality_cert"], pki["rogue-modality_key"]),
            "modality": (pki["modality_cert"], pki["modality_key"])}[client]
    with caplog.at_level(logging.WARNING), DicomNode(_tls_node_config(pki, store=str(tmp_path)), defender) as node:
        assoc = _assoc(node.port, (pki["ca"], *cert))
        ok = assoc.is_established and assoc.send_c_echo().Status == 0x0000
        if assoc.is_established:
            assoc.release()
        assert ok is established
    refusals = _refusals(caplog)
    why = {"none": "PEER_DID_NOT_RETURN_A_CERTIFICATE", "rogue": "CERTIFICATE_VERIFY_FAILED"}.get(client)
    assert len(refusals) == (0 if established else 1) and (why is None or why in refusals[0]), refusals


def test_without_require_a_client_without_certificate_may_associate(pki, defender, tmp_path):
    cfg = _tls_node_config(pki, store=str(tmp_path), tls_require_client_cert=False)
    with DicomNode(cfg, defender) as node:
        assert node.transport == " over TLS (client certificate verified when presented)"
        assoc = _assoc(node.port, (pki["ca"], None, None))
        assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
        assoc.release()
        rogue = _assoc(node.port, (pki["ca"], pki["rogue-modality_cert"], pki["rogue-modality_key"]))
        assert not (rogue.is_established and rogue.send_c_echo().Status == 0x0000)  # presented: verified


def test_the_client_refuses_a_node_whose_certificate_it_cannot_verify(pki, defender, tmp_path):
    with DicomNode(_tls_node_config(pki, store=str(tmp_path)), defender) as node:
        assert not _assoc(node.port, (pki["rogue_ca"], pki["modality_cert"], pki["modality_key"])).is_established


def test_a_silent_connection_does_not_stop_the_node_accepting(pki, defender, tmp_path, caplog):
    """The handshake runs in the association's thread, not in the listener's: a caller that connects
    and sends nothing, or stops halfway through its first TLS record, holds only its own connection;
    the half-sent one is closed once the handshake timeout has passed."""
    cfg = _tls_node_config(pki, store=str(tmp_path), tls_handshake_timeout_s=2.0)
    with caplog.at_level(logging.WARNING), DicomNode(cfg, defender) as node, \
            socket.create_connection(("127.0.0.1", node.port)) as silent, \
            socket.create_connection(("127.0.0.1", node.port)) as stalled:
        stalled.sendall(b"\x16\x03\x01\x02\x00")  # a handshake record header announcing 512 bytes, then nothing
        sent_at = time.monotonic()
        time.sleep(0.2)
        t0 = time.monotonic()
        assoc = _assoc(node.port, (pki["ca"], pki["modality_cert"], pki["modality_key"]))
        assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
        assoc.release()
        assert time.monotonic() - t0 < TIMEOUT - 1  # not held up behind the stalled caller
        stalled.settimeout(TIMEOUT)
        try:
            assert stalled.recv(1) == b""  # closed by the node
        except ConnectionResetError:
            pass
        assert 1.8 < time.monotonic() - sent_at < TIMEOUT - 1
        assert silent.fileno() >= 0
    assert any("timed out" in m for m in _refusals(caplog))


# -- the forward destination's certificate ---------------------------------------------------------

@pytest.mark.parametrize(("pacs_cert", "hostname", "why"), [
    ("rogue-pacs", None, "signed by another CA"),
    ("pacs", "pacs.example.org", "names another host"),
])
def test_an_untrusted_forward_destination_is_forward_failed(pki, defender, tmp_path, pacs_cert, hostname, why):
    pacs = _TlsPacs(pki[f"{pacs_cert}_cert"], pki[f"{pacs_cert}_key"], ca=None)
    try:
        cfg = NodeConfig(port=0, forward=ForwardTarget("127.0.0.1", pacs.port, "PACS"), forward_timeout_s=TIMEOUT,
                         forward_tls_ca=pki["ca"], forward_tls_hostname=hostname)
        with DicomNode(cfg, defender) as node:
            assoc = _assoc(node.port, None)
            status = assoc.send_c_store(pydicom.dcmread(MR))
            assoc.release()
            assert status.Status == scp.FORWARD_FAILED == 0xA701, why
            assert "PACS@127.0.0.1" in str(status.ErrorComment)
            assert "--forward-tls-ca" in node.last_outcome.reason
            assert node.last_outcome.results[0].ok  # classified; only the delivery failed
    finally:
        pacs.close()
    assert pacs.received == []


def test_a_plain_forward_destination_with_forward_tls_is_forward_failed(pki, defender):
    dest = AE(ae_title="PACS")
    dest.add_supported_context(ComprehensiveSRStorage)
    server = dest.start_server(("127.0.0.1", 0), block=False)
    try:
        cfg = NodeConfig(port=0, forward=ForwardTarget("127.0.0.1", server.server_address[1], "PACS"),
                         forward_timeout_s=3.0, forward_tls_ca=pki["ca"])
        with DicomNode(cfg, defender) as node:
            assoc = _assoc(node.port, None)
            assert assoc.send_c_store(pydicom.dcmread(MR)).Status == 0xA701
            assoc.release()
    finally:
        server.shutdown()


# -- configuration -------------------------------------------------------------------------------------

def test_contexts_are_tls_1_2_or_later_without_compression(pki):
    srv = server_context(pki["node_cert"], pki["node_key"], pki["ca"], require_client_cert=True)
    cli = client_context(pki["ca"], pki["forwarder_cert"], pki["forwarder_key"])
    for ctx in (srv, cli):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
        assert ctx.options & ssl.OP_NO_COMPRESSION
    assert srv.verify_mode == ssl.CERT_REQUIRED
    assert cli.verify_mode == ssl.CERT_REQUIRED and cli.check_hostname
    assert server_context(pki["node_cert"], pki["node_key"], pki["ca"]).verify_mode == ssl.CERT_OPTIONAL
    assert server_context(pki["node_cert"], pki["node_key"]).verify_mode == ssl.CERT_NONE
    cfg = NodeConfig(forward=ForwardTarget("127.0.0.1", 104, "PACS"), forward_tls_ca=pki["ca"])
    assert cfg.forward_ssl_context()[1] == "127.0.0.1"  # the hostname checked: the forward host by default


@pytest.mark.parametrize(("kw", "match"), [
    (dict(tls_cert="node_cert"), "pass both --tls-cert and --tls-key .got only --tls-cert"),
    (dict(tls_key="node_key"), "got only --tls-key"),
    (dict(tls_ca="ca"), "--tls-ca verifies client certificates"),
    (dict(tls_cert="node_cert", tls_key="node_key", tls_require_client_cert=True), "needs .* pass --tls-ca"),
    (dict(tls_cert="garbage", tls_key="node_key"), "garbage.pem'?: not a PEM certificate"),
    (dict(tls_cert="node_key", tls_key="node_cert"), "holds a private key: swap"),
    (dict(tls_cert="node_cert", tls_key="pacs_key"), "pacs.key'? does not belong to the certificate"),
    (dict(tls_cert="node_cert", tls_key="encrypted_key"), "encrypted.*openssl pkey"),
    (dict(tls_cert="expired_cert", tls_key="expired_key"), "expired on .*renew it"),
    (dict(tls_cert="node_cert", tls_key="node_key", tls_ca="garbage"), "TLS CA .*garbage.pem"),
    (dict(tls_cert="missing", tls_key="node_key"), "missing.pem'?: no such file"),
    (dict(tls_cert="node_cert", tls_key="node_key", tls_handshake_timeout_s=0), "tls_handshake_timeout_s"),
    (dict(forward_tls_ca="ca"), "without --forward"),
])
def test_bad_tls_config_is_a_value_error_naming_the_file(pki, tmp_path, kw, match):
    paths = {**pki, "missing": str(tmp_path / "missing.pem")}
    kw = {k: paths.get(v, v) if isinstance(v, str) else v for k, v in kw.items()}
    with pytest.raises(ValueError, match=match):
        NodeConfig(store="x", **kw)


@pytest.mark.parametrize(("kw", "match"), [
    (dict(forward_tls_cert="forwarder_cert", forward_tls_key="forwarder_key"), "need --forward-tls-ca"),
    (dict(forward_tls_hostname="pacs"), "need --forward-tls-ca"),
    (dict(forward_tls_ca="ca", forward_tls_cert="forwarder_cert"), "pass both --forward-tls-cert and"),
    (dict(forward_tls_ca="garbage"), "forward TLS CA .*garbage.pem"),
    (dict(forward_tls_ca="ca", forward_tls_hostname=" "), "forward_tls_hostname is empty"),
])
def test_bad_forward_tls_config_is_a_value_error(pki, kw, match):
    kw = {k: pki.get(v, v) for k, v in kw.items()}
    with pytest.raises(ValueError, match=match):
        NodeConfig(forward=ForwardTarget("127.0.0.1", 104, "PACS"), **kw)


def test_remote_bind_error_points_to_tls_and_calling_aets():
    with pytest.raises(ValueError, match="allow_remote") as e:
        NodeConfig(store="x", bind="0.0.0.0")
    assert "--tls-require-client-cert" in str(e.value) and "--allow-calling-aet" in str(e.value)


@pytest.mark.parametrize(("args", "match"), [
    (["--tls-cert", "garbage", "--tls-key", "node_key"], "not a PEM certificate"),
    (["--tls-key", "node_key"], "pass both --tls-cert and --tls-key"),
    (["--tls-cert", "node_cert", "--tls-key", "node_key", "--tls-require-client-cert"], "pass --tls-ca"),
    (["--tls-cert", "node_cert", "--tls-key", "node_key", "--tls-ca", "missing"], "no such file"),
    (["--forward-tls-ca", "ca"], "without --forward"),
])
def test_listen_bad_tls_settings_exit_2(pki, tmp_path, args, match):
    paths = {**pki, "missing": str(tmp_path / "missing.pem")}
    res = CliRunner().invoke(app, ["listen", "--port", "0", "--store", str(tmp_path / "r"),
                                   *[paths.get(a, a) for a in args]])
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: ") and match in res.output and "Traceback" not in res.output
