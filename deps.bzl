"""Offline dependencies of procpool.

Everything here comes from Debian packages already on the machine (see tools/install_deps.sh):
nothing is downloaded. Call procpool_deps() from your WORKSPACE:

    local_repository(name = "procpool", path = "...")
    load("@procpool//:deps.bzl", "procpool_deps")
    procpool_deps()
"""

# ---------------------------------------------------------------------------------------------
# Local stand-ins for the repositories Bazel 4 would otherwise download.

_RULES_CC_DEFS = '''
"""Local stand-in for rules_cc: re-exports the native C/C++ rules."""

def cc_binary(**kwargs):
    native.cc_binary(**kwargs)

def cc_import(**kwargs):
    native.cc_import(**kwargs)

def cc_library(**kwargs):
    native.cc_library(**kwargs)

def cc_proto_library(**kwargs):
    native.cc_proto_library(**kwargs)

def cc_test(**kwargs):
    native.cc_test(**kwargs)

def cc_toolchain(**kwargs):
    native.cc_toolchain(**kwargs)

def cc_toolchain_suite(**kwargs):
    native.cc_toolchain_suite(**kwargs)

def fdo_prefetch_hints(**kwargs):
    native.fdo_prefetch_hints(**kwargs)

def fdo_profile(**kwargs):
    native.fdo_profile(**kwargs)

def objc_library(**kwargs):
    native.objc_library(**kwargs)

def objc_import(**kwargs):
    native.objc_import(**kwargs)
'''

_RULES_JAVA_DEFS = '''
"""Local stand-in for rules_java: re-exports the native Java rules."""

def java_binary(**kwargs):
    native.java_binary(**kwargs)

def java_import(**kwargs):
    native.java_import(**kwargs)

def java_library(**kwargs):
    native.java_library(**kwargs)

def java_plugin(**kwargs):
    native.java_plugin(**kwargs)

def java_runtime(**kwargs):
    native.java_runtime(**kwargs)

def java_test(**kwargs):
    native.java_test(**kwargs)

def java_toolchain(**kwargs):
    native.java_toolchain(**kwargs)

def java_package_configuration(**kwargs):
    native.java_package_configuration(**kwargs)
'''

_COVERAGE_TOOLS_BUILD = '''
package(default_visibility = ["//visibility:public"])

filegroup(name = "coverage_report_generator", srcs = [])

filegroup(name = "lcov_merger", srcs = [])
'''

def _files_repo_impl(ctx):
    for path, content in ctx.attr.files.items():
        ctx.file(path, content, executable = False)

_files_repo = repository_rule(
    implementation = _files_repo_impl,
    attrs = {"files": attr.string_dict(mandatory = True)},
    doc = "A repository made of the given literal files (path -> content).",
)

# ---------------------------------------------------------------------------------------------
# System libraries (Debian packages).

# Shared Abseil libraries (Debian libabsl-dev, 20220623) needed by Status/StatusOr, Mutex/CondVar,
# Time/Duration, StrCat/StrFormat, Cord, flat_hash_map/node_hash_map, Span, etc.
_ABSL_LIBS = [
    "absl_status",
    "absl_statusor",
    "absl_cord",
    "absl_cord_internal",
    "absl_cordz_info",
    "absl_cordz_handle",
    "absl_cordz_functions",
    "absl_cordz_sample_token",
    "absl_str_format_internal",
    "absl_strings",
    "absl_strings_internal",
    "absl_strerror",
    "absl_synchronization",
    "absl_graphcycles_internal",
    "absl_time",
    "absl_time_zone",
    "absl_civil_time",
    "absl_hash",
    "absl_city",
    "absl_low_level_hash",
    "absl_raw_hash_set",
    "absl_hashtablez_sampler",
    "absl_exponential_biased",
    "absl_bad_optional_access",
    "absl_bad_variant_access",
    "absl_bad_any_cast_impl",
    "absl_int128",
    "absl_stacktrace",
    "absl_symbolize",
    "absl_debugging_internal",
    "absl_demangle_internal",
    "absl_examine_stack",
    "absl_malloc_internal",
    "absl_throw_delegate",
    "absl_raw_logging_internal",
    "absl_log_severity",
    "absl_spinlock_wait",
    "absl_base",
]

# --config=static (.bazelrc) links Abseil and Cap'n Proto from Debian's static archives (.a, built
# position-independent) instead of their shared objects: a binary then maps ~40 libraries fewer,
# so fork() copies fewer mappings and a forked worker faults in fewer pages of code.
_STATIC_SETTING = '''
config_setting(
    name = "static",
    define_values = {"procpool_static": "1"},
)
'''

def _linkopts(libs):
    """Shared by default; with --define=procpool_static=1 the static archives, as one group (the
    order of archives that use each other does not matter then)."""
    return '''select({
        ":static": ["-Wl,--start-group"] + [%s] + ["-Wl,--end-group"],
        "//conditions:default": [%s],
    })''' % (", ".join(['"-l:lib%s.a"' % lib for lib in libs]),
             ", ".join(['"-l%s"' % lib for lib in libs]))

_ABSL_BUILD = '''
package(default_visibility = ["//visibility:public"])
%s
# System Abseil: headers are in /usr/include/absl (a default include directory of the compiler),
# libraries in /usr/lib/x86_64-linux-gnu (shared, or static with --config=static).
cc_library(
    name = "absl",
    linkopts = %s + ["-lpthread"],
)
''' % (_STATIC_SETTING, _linkopts(_ABSL_LIBS))

_CAPNP_BUILD = '''
package(default_visibility = ["//visibility:public"])
%s
# System Cap'n Proto 0.9.2 (Debian libcapnp-dev): headers in /usr/include/{capnp,kj}; libraries
# shared, or static with --config=static.
cc_library(
    name = "capnp",
    linkopts = %s + ["-lpthread"],
)

# The schema compiler and its C++ plugin (symlinks to /usr/bin/capnp, /usr/bin/capnpc-c++).
exports_files(["bin/capnp", "bin/capnpc-c++"])

filegroup(name = "capnp_tool", srcs = ["bin/capnp"])

filegroup(name = "capnpc_cxx", srcs = ["bin/capnpc-c++"])

# The system schemas (/usr/include/capnp/*.capnp, e.g. /capnp/c++.capnp); import root: include/.
filegroup(name = "system_schemas", srcs = glob(["include/capnp/*.capnp"]))
''' % (_STATIC_SETTING, _linkopts(["capnp", "kj"]))

def _system_capnp_impl(ctx):
    for tool in ["capnp", "capnpc-c++"]:
        path = ctx.which(tool)
        if path == None:
            fail("procpool: '%s' not found on PATH; install the Debian package capnproto" % tool)
        ctx.symlink(path, "bin/" + tool)
    schema_dir = ctx.path(ctx.attr.schema_dir)
    if not schema_dir.exists:
        fail("procpool: %s not found; install the Debian package libcapnp-dev" % schema_dir)
    for f in schema_dir.readdir():
        if f.basename.endswith(".capnp"):
            ctx.symlink(f, "include/capnp/" + f.basename)
    ctx.file("BUILD.bazel", _CAPNP_BUILD)

_system_capnp = repository_rule(
    implementation = _system_capnp_impl,
    attrs = {"schema_dir": attr.string(default = "/usr/include/capnp")},
    local = True,
)

_DOCTEST_BUILD = '''
package(default_visibility = ["//visibility:public"])

# System doctest 2.4.9 (Debian doctest-dev): #include <doctest/doctest.h> from /usr/include.
cc_library(name = "doctest")

# Link this into a cc_test to get doctest's main().
cc_library(
    name = "doctest_main",
    srcs = ["doctest_main.cc"],
    deps = [":doctest"],
    alwayslink = True,
)
'''

_DOCTEST_MAIN = '''#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>
'''

def _maybe(rule, name, **kwargs):
    if not native.existing_rule(name):
        rule(name = name, **kwargs)

def procpool_deps():
    """Declares every external repository procpool needs, all local (nothing is downloaded)."""
    _maybe(_files_repo, "rules_cc", files = {
        "WORKSPACE": 'workspace(name = "rules_cc")\n',
        "BUILD.bazel": "",
        "cc/BUILD.bazel": 'exports_files(["defs.bzl"])\n',
        "cc/defs.bzl": _RULES_CC_DEFS,
    })
    _maybe(_files_repo, "rules_java", files = {
        "WORKSPACE": 'workspace(name = "rules_java")\n',
        "BUILD.bazel": "",
        "java/BUILD.bazel": 'exports_files(["defs.bzl"])\n',
        "java/defs.bzl": _RULES_JAVA_DEFS,
    })
    _maybe(_files_repo, "remote_coverage_tools", files = {
        "WORKSPACE": 'workspace(name = "remote_coverage_tools")\n',
        "BUILD.bazel": _COVERAGE_TOOLS_BUILD,
    })
    _maybe(_files_repo, "procpool_absl", files = {
        "WORKSPACE": 'workspace(name = "procpool_absl")\n',
        "BUILD.bazel": _ABSL_BUILD,
    })
    _maybe(_system_capnp, "procpool_capnp")
    _maybe(_files_repo, "procpool_doctest", files = {
        "WORKSPACE": 'workspace(name = "procpool_doctest")\n',
        "BUILD.bazel": _DOCTEST_BUILD,
        "doctest_main.cc": _DOCTEST_MAIN,
    })
