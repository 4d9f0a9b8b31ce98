/**
 * A budget of bytes that the blob senders copy into sockets per turn of the event loop. Node has
 * no sendfile: every byte of a stored blob is copied into its socket by the main thread, inside
 * the callback that read it. With 32 clients a turn of the loop then ran for 10-30 ms, and a
 * manifest request waited for one or two of them. Past the budget, a sender's next write waits
 * for the end of the turn (`setImmediate`), where the waiting writes go out in order up to the
 * budget again: a turn stays short, the requests that arrived meanwhile are read in the next
 * one, and the bytes still leave as fast as the thread can copy them.
 */
export const TURN_BUDGET = 2 * 1024 * 1024;

let spent = 0;
let scheduled = false;
const waiting: { bytes: number; go: () => void }[] = [];

function endOfTurn(): void {
  spent = 0;
  while (waiting.length > 0 && spent < TURN_BUDGET) {
    const next = waiting.shift()!;
    spent += next.bytes;
    next.go();
  }
  if (waiting.length > 0 || spent > 0) setImmediate(endOfTurn);
  else scheduled = false;
}

/**
 * Resolves when `bytes` may be written in this turn: at once (undefined) while the turn's budget
 * lasts and nobody waits, else at the end of a turn with room.
 */
export function turnSlot(bytes: number): Promise<void> | undefined {
  if (!scheduled) {
    scheduled = true;
    setImmediate(endOfTurn);
  }
  if (spent < TURN_BUDGET && waiting.length === 0) {
    spent += bytes;
    return undefined;
  }
  return new Promise((go) => waiting.push({ bytes, go }));
}
