/**
 * The status page's files are read from static/ beside src/ and dist/: they must reach the Docker
 * image and the npm package, or `GET /` has nothing to serve there.
 */
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { expect, test } from 'vitest';

test("the status page's files reach the image and the npm package", () => {
  const dockerfile = readFileSync('Dockerfile', 'utf8');
  const runtime = dockerfile.slice(dockerfile.lastIndexOf('\nFROM '));
  // The runtime stage works in /app, with dist/ and static/ side by side.
  expect(runtime).toMatch(/^WORKDIR \/app$/m);
  expect(runtime).toMatch(/^COPY --from=build \/src\/dist \.\/dist$/m);
  expect(runtime).toMatch(/^COPY static \.\/static$/m);
  const packed = JSON.parse(
    execFileSync('npm', ['pack', '--dry-run', '--json', '--ignore-scripts'], { encoding: 'utf8' }),
  ) as { files: { path: string }[] }[];
  const files = packed[0]!.files.map((f) => f.path);
  for (const name of ['index.html', 'app.js', 'app.css'])
    expect(files).toContain(`static/status/${name}`);
});
