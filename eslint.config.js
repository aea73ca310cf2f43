// The TypeScript lint gate (`npm run lint`, run by .ci/run): ESLint's and
// typescript-eslint's recommended rules, which find bugs, not style. No
// formatter and no stylistic rules. The project's choices are listed here,
// once, each with its reason.
import js from '@eslint/js'
import globals from 'globals'
import tseslint from 'typescript-eslint'

export default tseslint.config(
  { ignores: ['**/node_modules/', 'benchmark/results/'] },
  js.configs.recommended,
  tseslint.configs.recommended,
  {
    languageOptions: { globals: globals.node },
    rules: {
      // `_`-prefixed names are deliberately unused: an Express error handler's
      // fourth argument (its arity marks it), a key left out of a rest copy,
      // the item of a loop that only drains a stream.
      '@typescript-eslint/no-unused-vars': [
        'error',
        { argsIgnorePattern: '^_', varsIgnorePattern: '^_', caughtErrorsIgnorePattern: '^_' },
      ],
      // `catch {}` is how a best-effort step (probing, cleanup) says "ignore".
      'no-empty': ['error', { allowEmptyCatch: true }],
    },
  },
  {
    // Tests read response bodies of any shape (including wrong ones) as JSON.
    files: ['__test__/**'],
    rules: { '@typescript-eslint/no-explicit-any': 'off' },
  },
)
