// A read's pieces of one file, noted as [file position, buffer offset, length] triples: a
// piece that follows on from the last one in the file and in the buffer joins it, so
// adjacent pieces go to the thread pool as one pread.

/** Note `length` bytes at `position` into buffer offset `dstOffset`. True when they start a new run, false when they joined the last. */
export function addRun(runs: number[], position: number, dstOffset: number, length: number): boolean {
  const last = runs.length - 3;
  if (last >= 0 && runs[last] + runs[last + 2] === position && runs[last + 1] + runs[last + 2] === dstOffset) {
    runs[last + 2] += length;
    return false;
  }
  runs.push(position, dstOffset, length);
  return true;
}
