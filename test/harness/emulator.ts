// A storage emulator as a child process (fake-gcs-server, Azurite): started detached on a
// loopback port with a fresh data folder, ready when its probe answers, stopped by pid.

import { spawn, type ChildProcess } from 'node:child_process';
import { removeDir, scratchDir } from './daemon.js';
import { killTree, tail } from './tools.js';

const READY_TIMEOUT_MS = 30_000;

export interface EmulatorProcess {
  readonly pid: number;
  /** The folder the emulator keeps its data in (removed by stop). */
  dataDir: string;
  /** The emulator's output so far (last 64 KiB). */
  log(): string;
  /** SIGKILL the emulator (its process group), wait for it to exit, remove its data folder. */
  stop(): Promise<void>;
}

export interface EmulatorSpec {
  name: string;
  command: string;
  /** The arguments, given the data folder. */
  args(dataDir: string): string[];
  /** Resolves true once the emulator answers requests. */
  ready(): Promise<boolean>;
}

export async function startEmulator(spec: EmulatorSpec): Promise<EmulatorProcess> {
  const dataDir = await scratchDir(`updraft-${spec.name}-`);
  let output = '';
  const child: ChildProcess = spawn(spec.command, spec.args(dataDir), { stdio: ['ignore', 'pipe', 'pipe'], detached: true });
  const remember = (chunk: Buffer) => {
    output = (output + chunk.toString('utf8')).slice(-65536);
  };
  child.stdout!.on('data', remember);
  child.stderr!.on('data', remember);
  const exited = new Promise<void>((resolve) => child.once('close', () => resolve()));
  child.once('error', (err) => {
    output += `\ncannot start ${spec.command}: ${err.message}`;
  });
  const onExit = () => killTree(child.pid);
  process.once('exit', onExit);
  const stop = async () => {
    process.removeListener('exit', onExit);
    if (child.exitCode === null && child.signalCode === null) killTree(child.pid);
    await exited;
    await removeDir(dataDir);
  };
  try {
    const deadline = Date.now() + READY_TIMEOUT_MS;
    for (;;) {
      if (child.exitCode !== null || child.signalCode !== null) throw new Error(`${spec.name} exited before it was ready`);
      if (await spec.ready().catch(() => false)) break;
      if (Date.now() > deadline) throw new Error(`${spec.name} not ready after ${READY_TIMEOUT_MS} ms`);
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  } catch (err) {
    await stop();
    throw new Error(`${(err as Error).message}\n--- ${spec.name} output (tail) ---\n${tail(output, 30)}`, { cause: err });
  }
  return { pid: child.pid!, dataDir, log: () => output, stop };
}
