// Symbols the prebuilt Jazzer.js addon (built against glibc 2.38 and GCC 13's libstdc++)
// needs and an older system (glibc 2.36, GCC 12) lacks. Preloaded into the fuzzer only.
#include <cstdlib>
#include <ios>

// C23's strtol/strtoul also accept a "0b" prefix; libFuzzer parses only decimal flags.
extern "C" long __isoc23_strtol(const char *text, char **end, int base) { return std::strtol(text, end, base); }
extern "C" unsigned long __isoc23_strtoul(const char *text, char **end, int base) { return std::strtoul(text, end, base); }

// GCC 13 headers reference this to make sure the standard streams are initialised.
namespace std {
void ios_base_library_init() { static ios_base::Init init; }
}
