# procpool's test-discovery step for doctest_discover_tests() (tests/CMakeLists.txt points the
# doctest module at this file through _DOCTEST_DISCOVER_TESTS_SCRIPT). Run with `cmake -P` after a
# test binary is built, with the -D variables doctest.cmake passes: it lists the binary's test
# cases and writes CTEST_FILE, which registers one ctest test per test case.
#
# Why not doctest 2.4.9's own doctestAddTests.cmake: our test names are sentences, and
#   * a name with a ';' is cut into several "tests" (it handles the list of names as a CMake list),
#   * a name with a ',' is passed as "--test-case=a\, b", and doctest 2.4.9 reads the comma as a
#     filter separator; in both cases the filter matches no test case and doctest exits 0, so
#     ctest reported a pass for a test that never ran (28 of 89 before this file).
# Here every ',' and ';' in a name becomes the filter wildcard '?', and each test must print
# doctest's summary for exactly one test case run and passed (PASS_REGULAR_EXPRESSION): a filter
# that matches none, or more than one, fails instead of passing.

if(NOT EXISTS "${TEST_EXECUTABLE}")
  message(FATAL_ERROR "doctest_add_tests: '${TEST_EXECUTABLE}' does not exist")
endif()

set(_spec "")
if(NOT "${TEST_SPEC}" STREQUAL "")
  set(_spec "--test-case=${TEST_SPEC}")
endif()
execute_process(
  COMMAND ${TEST_EXECUTOR} "${TEST_EXECUTABLE}" ${_spec} --list-test-cases
  OUTPUT_VARIABLE _output
  RESULT_VARIABLE _result
  WORKING_DIRECTORY "${TEST_WORKING_DIR}")
if(NOT _result EQUAL 0)
  message(FATAL_ERROR "doctest_add_tests: '${TEST_EXECUTABLE} --list-test-cases' failed "
                      "(${_result}):\n${_output}")
endif()

# One name per line. Not split into a CMake list: a ';' in a name, or an unbalanced '[', would
# cut or merge names there.
string(ASCII 31 _unit_separator)
string(REPLACE ";" "${_unit_separator}" _output "${_output}")
set(_lines "")
while(NOT _output STREQUAL "")
  string(FIND "${_output}" "\n" _end)
  if(_end EQUAL -1)
    set(_line "${_output}")
    set(_output "")
  else()
    string(SUBSTRING "${_output}" 0 ${_end} _line)
    math(EXPR _next "${_end} + 1")
    string(SUBSTRING "${_output}" ${_next} -1 _output)
  endif()
  string(REPLACE "[" "${_unit_separator}open" _line "${_line}")
  string(REPLACE "]" "${_unit_separator}close" _line "${_line}")
  list(APPEND _lines "${_line}")
endwhile()

# A bracket argument that holds `text` verbatim, whatever it contains.
function(_bracket text out)
  set(_eq "=")
  while(text MATCHES "\\]${_eq}\\]")
    string(APPEND _eq "=")
  endwhile()
  set(${out} "[${_eq}[${text}]${_eq}]" PARENT_SCOPE)
endfunction()

set(_script "")
set(_tests "")
set(_pass "\\[doctest\\] test cases: +1 \\| +1 passed \\| +0 failed")
_bracket("${_pass}" _pass_arg)
_bracket("${TEST_WORKING_DIR}" _dir_arg)
_bracket("${TEST_EXECUTABLE}" _exe_arg)
set(_extra "")
foreach(_arg IN LISTS TEST_EXTRA_ARGS)
  _bracket("${_arg}" _b)
  string(APPEND _extra " ${_b}")
endforeach()
set(_props "")
foreach(_arg IN LISTS TEST_PROPERTIES)
  _bracket("${_arg}" _b)
  string(APPEND _props " ${_b}")
endforeach()

foreach(_line IN LISTS _lines)
  string(REPLACE "${_unit_separator}open" "[" _line "${_line}")
  string(REPLACE "${_unit_separator}close" "]" _line "${_line}")
  if(_line STREQUAL "" OR _line MATCHES "^=+$" OR _line MATCHES "^\\[doctest\\] ")
    continue()
  endif()
  # The filter: doctest's '?' stands for the ',' or ';' it could not take literally.
  string(REPLACE "," "?" _filter "${_line}")
  string(REPLACE "${_unit_separator}" "?" _filter "${_filter}")
  # The ctest name: a ';' would make it a list there too.
  string(REPLACE "${_unit_separator}" "," _name "${TEST_PREFIX}${_line}${TEST_SUFFIX}")
  _bracket("${_name}" _name_arg)
  _bracket("--test-case=${_filter}" _filter_arg)
  string(APPEND _script
    "add_test(${_name_arg} ${TEST_EXECUTOR} ${_exe_arg} ${_filter_arg}${_extra})\n"
    "set_tests_properties(${_name_arg} PROPERTIES WORKING_DIRECTORY ${_dir_arg}\n"
    "  PASS_REGULAR_EXPRESSION ${_pass_arg}${_props})\n")
  list(APPEND _tests "${_name}")
endforeach()

if(_tests STREQUAL "")
  message(FATAL_ERROR "doctest_add_tests: '${TEST_EXECUTABLE}' lists no test cases")
endif()
if(NOT "${TEST_LIST}" STREQUAL "")
  set(_list "")
  foreach(_t IN LISTS _tests)
    _bracket("${_t}" _b)
    string(APPEND _list " ${_b}")
  endforeach()
  string(APPEND _script "set(${TEST_LIST}${_list})\n")
endif()
file(WRITE "${CTEST_FILE}" "${_script}")
