"""What coord takes from a verified ID token: the user's email, their groups as the policy names
them, and whether the mesh admits them (pure functions; the provider tests are beside this)."""

from __future__ import annotations

import dataclasses

import pytest

from wiremesh.coord.oidc import (
    Identity,
    OidcConfig,
    OidcError,
    admission,
    authorization_url,
    identity_from,
    pkce_challenge,
    qualify_group,
)

CONFIG = OidcConfig(issuer="https://idp.example/", client_id="wiremesh", client_secret="s", redirect_uri="x")
CLAIMS = {"iss": "https://idp.example/", "sub": "u-1", "email": "Alice@Example.com", "email_verified": True}


def test_pkce_challenge_is_rfc7636_s256() -> None:
    # RFC 7636 appendix B.
    assert (
        pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk")
        == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    )


def test_authorization_url_carries_state_nonce_and_the_challenge() -> None:
    url = authorization_url("https://idp.example/auth?x=1", CONFIG, "st", "no", "ch", prompt="login")
    assert url.startswith("https://idp.example/auth?x=1&response_type=code&client_id=wiremesh")
    for part in ("state=st", "nonce=no", "code_challenge=ch", "code_challenge_method=S256", "prompt=login"):
        assert part in url


def test_bare_group_names_take_the_users_email_domain_and_fold_ascii_case() -> None:
    identity = identity_from(
        {**CLAIMS, "groups": ["Engineering", "ops@corp.example", "/eng/sre", "bad name"]}, CONFIG
    )
    assert identity.groups == ("eng/sre@example.com", "engineering@example.com", "ops@corp.example")


def test_a_configured_groups_domain_wins() -> None:
    config = dataclasses.replace(CONFIG, groups_domain="groups.example")
    assert identity_from({**CLAIMS, "groups": ["eng"]}, config).groups == ("eng@groups.example",)


def test_groups_may_come_from_userinfo_when_the_id_token_has_none() -> None:
    assert identity_from(CLAIMS, CONFIG, {"groups": ["eng"]}).groups == ("eng@example.com",)


def test_unverified_email_is_refused_unless_allowed() -> None:
    with pytest.raises(OidcError, match="has not verified"):
        identity_from({**CLAIMS, "email_verified": False}, CONFIG)
    config = dataclasses.replace(CONFIG, allow_unverified_email=True)
    assert identity_from({**CLAIMS, "email_verified": False}, config).email == "Alice@Example.com"


def test_missing_email_is_refused() -> None:
    with pytest.raises(OidcError, match="no usable email"):
        identity_from({"iss": "i", "sub": "s"}, CONFIG)


@pytest.mark.parametrize(
    ("domains", "users", "groups", "admitted"),
    [
        ((), (), (), True),
        (("example.com",), (), (), True),
        (("other.example",), (), (), False),
        (("other.example",), ("alice@example.com",), (), True),
        ((), (), ("group:Engineering@example.com",), True),
        ((), (), ("ops@example.com",), False),
    ],
)
def test_admission(
    domains: tuple[str, ...], users: tuple[str, ...], groups: tuple[str, ...], admitted: bool
) -> None:
    config = dataclasses.replace(CONFIG, allowed_domains=domains, allowed_users=users, allowed_groups=groups)
    identity = Identity("i", "s", "Alice@Example.com", "", ("engineering@example.com",))
    assert (admission(identity, config) is None) is admitted


@pytest.mark.parametrize("value", ["", "a b", "x:y", "@example.com", "eng@", "a@b@c", "x" * 200])
def test_unusable_group_values_are_dropped(value: str) -> None:
    assert qualify_group(value, "example.com") is None
