// Zod schemas of the JSON fields the store formats share (lease, manifest meta), and the
// one-line wording of a validation failure: "field generation: <what is wrong>".
import * as z from 'zod';
import { checkpointNameProblem, volumeNameProblem } from '../volume/names.js';

export const isoTimeField = z
  .string()
  .refine((s) => /^\d{4}-\d\d-\d\dT/.test(s) && !Number.isNaN(Date.parse(s)), 'expected an ISO time such as "2025-01-31T12:00:00.000Z"');

export const volumeNameField = z.string().superRefine((name, ctx) => {
  const problem = volumeNameProblem(name);
  if (problem) ctx.addIssue({ code: 'custom', message: problem });
});

export const checkpointNameField = z.string().superRefine((name, ctx) => {
  const problem = checkpointNameProblem(name);
  if (problem) ctx.addIssue({ code: 'custom', message: problem });
});

/** A non-negative integer a JSON number holds exactly. */
export const countField = z.number().int().min(0).max(Number.MAX_SAFE_INTEGER);

/** The first problem zod found, as "field a.b: message". */
export function fieldProblem(error: z.ZodError): string {
  const issue = error.issues[0];
  return `field ${issue.path.length > 0 ? issue.path.join('.') : '(top level)'}: ${issue.message}`;
}
