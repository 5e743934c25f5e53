"""HTTP Digest and TR-064's in-SOAP hash against the published vectors (RFC 7616 section
3.9.1, the specification's Fritz!Box vector), the box's challenge as it is sent, header
parsing of what servers write, nc counting, and the server's check of an answer."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from dpvoip.protocols.digest import (
    Challenge,
    DigestError,
    DigestState,
    parse_authorization,
    parse_challenge,
    parse_params,
    soap_auth,
    verify,
)

RFC_CHALLENGE = ('Digest realm="http-auth@example.org", qop="auth, auth-int", algorithm=MD5, '
                 'nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v", '
                 'opaque="FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"')
RFC_CNONCE = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ"
BOX_CHALLENGE = ('Digest realm="F!Box SOAP-Auth", nonce="A1B2C3D4E5F60718", '
                 'algorithm=MD5, qop="auth"')


class VectorTests(SynchronousTestCase):
    def test_rfc_7616_md5_example(self) -> None:
        challenge = parse_challenge([RFC_CHALLENGE])
        assert challenge is not None
        state = DigestState(challenge, lambda: RFC_CNONCE)
        header = state.authorization("Mufasa", "Circle of Life", "GET", "/dir/index.html")
        self.assertIn('response="8ca523f5e9506fed4657c9700eebdbec"', header)
        self.assertEqual(
            header,
            'Digest username="Mufasa", realm="http-auth@example.org", '
            'nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v", uri="/dir/index.html", '
            f'algorithm=MD5, qop=auth, nc=00000001, cnonce="{RFC_CNONCE}", '
            'response="8ca523f5e9506fed4657c9700eebdbec", '
            'opaque="FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"')

    def test_the_specifications_tr064_vector(self) -> None:
        self.assertEqual(soap_auth("admin", "F!Box SOAP-Auth", "gurkensalat", "F758BE72FB999CEA"),
                         "b4f67585f22b0af7c4615db5a18faa14")

    def test_the_soap_hash_depends_on_every_input(self) -> None:
        base = soap_auth("admin", "F!Box SOAP-Auth", "gurkensalat", "F758BE72FB999CEA")
        for other in (soap_auth("Admin", "F!Box SOAP-Auth", "gurkensalat", "F758BE72FB999CEA"),
                      soap_auth("admin", "F!Box SOAP-auth", "gurkensalat", "F758BE72FB999CEA"),
                      soap_auth("admin", "F!Box SOAP-Auth", "gurkensalat!", "F758BE72FB999CEA"),
                      soap_auth("admin", "F!Box SOAP-Auth", "gurkensalat", "F758BE72FB999CEB")):
            self.assertNotEqual(other, base)


class CountingTests(SynchronousTestCase):
    def setUp(self) -> None:
        challenge = parse_challenge([BOX_CHALLENGE])
        assert challenge is not None
        self.challenge = challenge
        self.cnonces = iter(["c1", "c2", "c3"])
        self.state = DigestState(challenge, lambda: next(self.cnonces))

    def test_nc_counts_up_with_each_request_and_each_request_verifies(self) -> None:
        uri = "/upnp/control/x_contact"
        headers = [self.state.authorization("dpvoip", "s3cret", "POST", uri) for _ in range(3)]
        credentials = [parse_authorization(header) for header in headers]
        self.assertEqual([c.nc for c in credentials if c], [1, 2, 3])
        self.assertEqual([c.cnonce for c in credentials if c], ["c1", "c2", "c3"])
        for c in credentials:
            assert c is not None
            self.assertTrue(verify(c, "s3cret", self.challenge, "POST"))
            self.assertFalse(verify(c, "s3cret!", self.challenge, "POST"))
            self.assertFalse(verify(c, "s3cret", self.challenge, "GET"))
        self.assertEqual(self.state.nc, 3)

    def test_an_answer_to_another_nonce_does_not_verify(self) -> None:
        c = parse_authorization(self.state.authorization("dpvoip", "pw", "POST", "/x"))
        assert c is not None
        other = Challenge("F!Box SOAP-Auth", "0000000000000000", ("auth",))
        self.assertFalse(verify(c, "pw", other, "POST"))

    def test_a_challenge_without_qop_is_answered_the_rfc_2069_way(self) -> None:
        challenge = parse_challenge(['Digest realm="r", nonce="n"'])
        assert challenge is not None
        header = DigestState(challenge, lambda: "unused").authorization("u", "p", "GET", "/")
        self.assertNotIn("nc=", header)
        self.assertNotIn("cnonce", header)
        c = parse_authorization(header)
        assert c is not None
        self.assertTrue(verify(c, "p", challenge, "GET"))

    def test_the_password_is_not_in_the_header(self) -> None:
        header = self.state.authorization("dpvoip", "VerySecret123", "POST", "/x")
        self.assertNotIn("VerySecret123", header)
        self.assertNotIn("VerySecret123", repr(self.state))

    def test_a_user_with_a_quote_is_escaped_and_a_newline_refused(self) -> None:
        header = self.state.authorization('a"b', "pw", "POST", "/x")
        c = parse_authorization(header)
        assert c is not None
        self.assertEqual(c.username, 'a"b')
        self.assertTrue(verify(c, "pw", self.challenge, "POST"))
        self.assertRaises(DigestError, self.state.authorization, "a\r\nX-Evil: 1", "pw",
                          "POST", "/x")


class ChallengeParsingTests(SynchronousTestCase):
    def test_the_box_challenge(self) -> None:
        self.assertEqual(parse_challenge([BOX_CHALLENGE]),
                         Challenge("F!Box SOAP-Auth", "A1B2C3D4E5F60718", ("auth",)))

    def test_stale_and_case(self) -> None:
        challenge = parse_challenge(['digest REALM="r", Nonce="n", STALE=TRUE, '
                                     'algorithm=md5, qop="auth"'])
        assert challenge is not None
        self.assertTrue(challenge.stale)
        self.assertEqual(challenge.algorithm, "MD5")
        self.assertFalse(Challenge("r", "n").stale)

    def test_digest_among_other_schemes_and_headers(self) -> None:
        found = parse_challenge(['Basic realm="a, b"',
                                 'Bearer abc==, Digest realm="x \\"y\\"", nonce="n,1"'])
        self.assertEqual(found, Challenge('x "y"', "n,1"))

    def test_no_digest_is_none(self) -> None:
        self.assertIsNone(parse_challenge(['Basic realm="F!Box"']))
        self.assertIsNone(parse_challenge([]))

    def test_unusable_challenges_are_refused_with_a_reason(self) -> None:
        for header, words in [
            ('Digest realm="r"', "no nonce"),
            ('Digest nonce="n"', "no realm"),
            ('Digest realm="r", nonce="n", algorithm=SHA-256', "only MD5"),
            ('Digest realm="r", nonce="n", qop="auth-int"', "qop=auth"),
            ('Digest realm="r", nonce="n\x01"', "control characters"),
            ('Digest realm="r, nonce=n', "unterminated"),
            ('Digest realm="r" @', "unexpected character"),
            ("Digest realm=" + "r" * 9000, "too long"),
        ]:
            error = self.assertRaises(DigestError, parse_challenge, [header])
            self.assertIn(words, str(error), header[:40])

    def test_a_challenge_renders_and_reads_back(self) -> None:
        challenge = Challenge("F!Box SOAP-Auth", "N1", ("auth",), opaque="o", stale=True)
        self.assertEqual(parse_challenge([challenge.header()]), challenge)

    def test_params_keep_their_order_and_scheme(self) -> None:
        self.assertEqual(parse_params('Digest a=1, b="2", Basic realm=x'),
                         [("Digest", {"a": "1", "b": "2"}), ("Basic", {"realm": "x"})])


class AuthorizationParsingTests(SynchronousTestCase):
    def test_another_scheme_is_none(self) -> None:
        self.assertIsNone(parse_authorization("Basic YWRtaW46cHc="))

    def test_a_digest_missing_its_response_is_refused(self) -> None:
        error = self.assertRaises(DigestError, parse_authorization,
                                  'Digest username="u", realm="r", nonce="n", uri="/"')
        self.assertIn("response", str(error))

    def test_a_bad_nc_is_refused(self) -> None:
        self.assertRaises(DigestError, parse_authorization,
                          'Digest username="u", realm="r", nonce="n", uri="/", '
                          'response="x", qop=auth, nc=zz, cnonce="c"')
