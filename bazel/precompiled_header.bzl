"""cc_precompiled_header: a GCC precompiled header for this workspace's own tests and benchmarks.

    cc_precompiled_header(
        name = "test_pch",                 # gives tests/test_pch.h and tests/test_pch.h.gch
        src = "test_pch_source.h",         # what it holds: #include lines
        deps = ["//:procpool_headers", "@procpool_absl//:absl"],
    )

Why: nearly every test and benchmark file starts by parsing procpool.h and Abseil's status,
strings and time headers, about 2.5 CPU-seconds of g++ each, for some 70 files. Parsed once into
a .gch, each file loads it in a fraction of that.

How a target uses it: depend on it (which makes the header and the .gch inputs of its compiles)
and compile with `-include <package>/<name>.h` (.bazelrc does that for tests/ and bench/ with
--per_file_copt). g++ looks for `<name>.h.gch` beside each `<name>.h` it may include; the copy of
the header exists only in the output tree, beside the .gch, so the .gch is what it finds.

Correctness never depends on it: the .gch is compiled by the target configuration's own C++
toolchain, with the same features, --copt/--cxxopt (a sanitizer config included), include paths
and defines as a test's compile gets from these deps. Where g++ judges it unusable (a flag or a
macro that differs; -Winvalid-pch says so) it parses the header's text instead, which is the same
code. With clang (--repo_env=CC=clang) the rule runs clang, which writes its own kind of
file under that name; such a build compiles and links as well.

Built only in this workspace: where procpool is an external repository (a consumer's build of
@procpool), the rule gives nothing (no action, no file), and .bazelrc's --per_file_copt, which
matches this workspace's paths only (lib/..., not external/procpool/lib/...), adds no -include.
So the library's own files may use one too (//lib:third_party_pch), and a consumer compiles them
exactly as before. Other builds of the same files without it (CMake, the consumer workspaces)
catch an include a file lacks.
"""

load("@bazel_tools//tools/build_defs/cc:action_names.bzl", "CPP_COMPILE_ACTION_NAME")
load("@bazel_tools//tools/cpp:toolchain_utils.bzl", "find_cpp_toolchain")

def _cc_precompiled_header_impl(ctx):
    if ctx.label.workspace_name:
        # procpool is an external repository here: see the file's doc.
        return [DefaultInfo(), CcInfo()]
    cc_toolchain = find_cpp_toolchain(ctx)
    feature_configuration = cc_common.configure_features(
        ctx = ctx,
        cc_toolchain = cc_toolchain,
        requested_features = ctx.features,
        unsupported_features = ctx.disabled_features,
    )
    deps_info = cc_common.merge_cc_infos(cc_infos = [d[CcInfo] for d in ctx.attr.deps])
    deps_context = deps_info.compilation_context

    # The header's copy, in the output tree only: see the file's doc for why.
    header = ctx.actions.declare_file(ctx.label.name + ".h")
    ctx.actions.expand_template(template = ctx.file.src, output = header, substitutions = {})
    gch = ctx.actions.declare_file(ctx.label.name + ".h.gch")

    variables = cc_common.create_compile_variables(
        feature_configuration = feature_configuration,
        cc_toolchain = cc_toolchain,
        source_file = header.path,
        output_file = gch.path,
        user_compile_flags = ctx.fragments.cpp.copts + ctx.fragments.cpp.cxxopts,
        include_directories = deps_context.includes,
        quote_include_directories = deps_context.quote_includes,
        system_include_directories = deps_context.system_includes,
        framework_include_directories = deps_context.framework_includes,
        preprocessor_defines = depset(transitive = [deps_context.defines]),
        # The .gch must be compiled as the files that load it are. In fastbuild and dbg, tests
        # and benchmarks link the library as shared objects, so their files are compiled
        # position-independent; with -c opt, binaries link statically and Bazel compiles their
        # objects without -fPIC. (Under --force_pic, which Starlark cannot see here, opt builds
        # parse the headers' text: slower, the same code.)
        use_pic = ctx.var["COMPILATION_MODE"] != "opt",
    )
    arguments = cc_common.get_memory_inefficient_command_line(
        feature_configuration = feature_configuration,
        action_name = CPP_COMPILE_ACTION_NAME,
        variables = variables,
    )
    env = cc_common.get_environment_variables(
        feature_configuration = feature_configuration,
        action_name = CPP_COMPILE_ACTION_NAME,
        variables = variables,
    )
    compiler = cc_common.get_tool_for_action(
        feature_configuration = feature_configuration,
        action_name = CPP_COMPILE_ACTION_NAME,
    )
    ctx.actions.run(
        executable = compiler,
        # -x applies to the input files after it: the header is the only one.
        arguments = ["-x", "c++-header"] + arguments,
        env = env,
        inputs = depset([header], transitive = [deps_context.headers, cc_toolchain.all_files]),
        outputs = [gch],
        mnemonic = "CppPrecompileHeader",
        progress_message = "Precompiling %s" % header.short_path,
    )

    own = CcInfo(compilation_context = cc_common.create_compilation_context(
        headers = depset([header, gch]),
    ))
    return [
        DefaultInfo(files = depset([header, gch])),
        cc_common.merge_cc_infos(cc_infos = [own, deps_info]),
    ]

cc_precompiled_header = rule(
    implementation = _cc_precompiled_header_impl,
    attrs = {
        "src": attr.label(allow_single_file = [".h"], mandatory = True),
        "deps": attr.label_list(providers = [CcInfo]),
        "_cc_toolchain": attr.label(default = "@bazel_tools//tools/cpp:current_cc_toolchain"),
    },
    fragments = ["cpp"],
    toolchains = ["@bazel_tools//tools/cpp:toolchain_type"],
    incompatible_use_toolchain_transition = True,
)
