"""Packaging for dpvoip.

``twisted.plugins`` is listed as a package (with no ``__init__.py`` of ours) so that
``twistd dpvoip`` finds the service maker; Twisted's plugin cache is rebuilt by
``dpvoip plugin-cache`` which the bootstrap script runs right after installing.
"""

from setuptools import find_packages, setup

setup(
    name="dpvoip",
    version="0.1.0",
    description="Telephony daemon for the D.P. Economy CRM: Fritz!Box CallMonitor, Zadarma, tickets",
    python_requires=">=3.11",
    packages=find_packages(include=["dpvoip", "dpvoip.*"]) + ["twisted.plugins"],
    package_data={"dpvoip": ["py.typed"], "dpvoip.crm": ["sql/*.sql"],
                  # the live page's script and style, and the CRM's screen pop
                  "dpvoip.web": ["static/*.js", "static/*.css"]},
    include_package_data=False,
    install_requires=[
        # Capped at the versions tested: dpvoip relies on a few private Twisted and
        # txpostgres attributes (all in dpvoip/internals.py, each with a contract test in
        # test/test_internals.py). Raise a cap only after those tests pass on the new one.
        "Twisted>=24.7,<26.11",
        "klein>=24.8,<24.9",
        # Werkzeug releases have broken klein before: only the range klein 24.8 is tested with.
        "Werkzeug>=3.0,<3.2",
        "treq>=24.9",
        "txpostgres==1.7.0",  # see the caps above: its Connection internals
        "psycopg2-binary>=2.9.9,<2.10",
        "service-identity>=24.1",
        "phonenumbers>=8.13",
        "pycountry>=24.6",
        "prometheus-client>=0.20",
        "PyJWT>=2.8,<3",
        # The CRM's sessions in Redis (REDIS_CACHE_URL). Only public API is used
        # (RedisFactory, startConnecting, handler, disconnect); capped below the next
        # minor release until the Redis session tests pass on it.
        "txredisapi>=1.6.0,<1.7",
        # The Fritz!Box's TR-064 answers and call list are XML from the network: parsed
        # without DTDs, entity expansion or external entities.
        "defusedxml>=0.7.1,<0.8",
    ],
    extras_require={
        # Only when no system PostgreSQL exists: a wheel carrying PostgreSQL binaries.
        "embedded": ["pgserver>=0.1.4"],
    },
    entry_points={
        "console_scripts": ["dpvoip = dpvoip.cli:main"],
        # Telephony provider kinds (dpvoip.providers.discovery): a third-party kind is a
        # package declaring its own entry point in this group.
        "dpvoip.providers": ["zadarma = dpvoip.zadarma.provider:KIND",
                             "asterisk = dpvoip.asterisk.provider:KIND"],
    },
)
